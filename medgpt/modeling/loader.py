"""Load a tokenizer and a causal LM the way `hardware`, `lora` and `quantize` ask: device, dtype, attention, 4/8-bit.

`model.name_or_path` is an embedded name (tiny, smollm2-135m), a local directory, or a hub id. A hub
id is first looked up in the local Hugging Face cache; without a network it fails with one sentence
instead of a stack of retries. `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgpt.errors import ConfigError, ModelError
from medgpt.modeling.embedded import EMBEDDED, embedded_path
from medgpt.modeling.precision import DTYPES, auto_dtype, cuda_bf16_native, resolve_precision, trainer_flags

__all__ = ["DTYPES", "Placement", "load_model", "load_tokenizer", "resolve_model_path", "resolve_placement"]

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """Where and in what precision a model loads and trains (medgpt.modeling.precision has the rules)."""

    device: str  # cpu | cuda | mps
    dtype: torch.dtype  # the dtype the weights load in (also `load_dtype`)
    attn_implementation: str
    mixed_precision: str | None = None  # the Trainer's autocast: "bf16" | "fp16" | None

    @property
    def load_dtype(self) -> torch.dtype:
        return self.dtype

    def trainer_flags(self) -> dict[str, bool]:
        """{"bf16": ..., "fp16": ...} for transformers.TrainingArguments, from the resolved mixed precision."""
        return trainer_flags(self.mixed_precision)


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_placement(hw: DictConfig, full_finetune: bool = False) -> Placement:
    """Device, load dtype, mixed precision and attention for `hardware` (auto detects; presets state them).

    `full_finetune` (lora=none) loads fp32 master weights where the dtype is fp16; see medgpt.modeling.precision.
    """
    device = hw.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"hardware={hw.name} asks for a CUDA GPU and none is visible: use hardware=cpu (or hardware=auto).")
    dtype = auto_dtype(device) if hw.dtype == "auto" else hw.dtype
    load_dtype, mixed = resolve_precision(device, dtype, full_finetune)
    attn = hw.attn_implementation
    if attn in ("auto", "flash_attention_2"):
        # flash-attn 2 runs on Ampere or newer (compute capability >= 8.0): a T4 gets sdpa, as hardware=t4 says
        has_flash = device == "cuda" and _flash_attn_installed() and cuda_bf16_native()
        if attn == "flash_attention_2" and not has_flash:
            log.warning("flash-attn is not available here (pip install 'medgpt[gpu]' on an Ampere or newer CUDA GPU); "
                        "using sdpa attention")
        attn = "flash_attention_2" if has_flash else "sdpa"
    return Placement(device, load_dtype, attn, mixed)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str, cache_dir: str, revision: str | None = None) -> str:
    """A local folder for `name_or_path`, converting embedded models on first use."""
    if name_or_path in EMBEDDED:
        return str(embedded_path(name_or_path, cache_dir))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model.name_or_path={name_or_path} is a folder without config.json: point it at a Hugging Face model folder.")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelError(f"model.name_or_path={name_or_path} does not exist (neither a folder, an embedded model "
                         f"({', '.join(EMBEDDED)}) nor a hub id like org/name).")
    from huggingface_hub import snapshot_download

    try:  # already in the local hub cache?
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelError(f"model {name_or_path} is not in the local Hugging Face cache and the hub cannot be reached: download it "
                         f"where there is a network (huggingface-cli download {name_or_path}) and set model.name_or_path=<folder>.")
    try:
        return snapshot_download(name_or_path, revision=revision)
    except Exception as e:
        raise ModelError(f"could not download {name_or_path} from the hub ({type(e).__name__}: {e}).") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # padding positions are masked out of every loss
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


QUANTIZE = ("int8", "nf4", "fp4")  # the inference key `quantize`; lora.quantization's 8bit / 4bit are int8 / nf4 + double quant


def require_bitsandbytes(kind: str, device: str, key: str = "quantize") -> None:
    """One sentence (ConfigError) when bitsandbytes is missing or has no backend for `device`."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key}={kind} needs bitsandbytes: pip install 'bitsandbytes>=0.49' (or {key}=none).")
    import bitsandbytes

    backends = sorted(getattr(bitsandbytes, "supported_torch_devices", {"cuda", "cpu"}))
    if device not in backends:
        raise ConfigError(f"{key}={kind}: bitsandbytes {bitsandbytes.__version__} has no {device} backend (it has: "
                          f"{', '.join(backends)}); use hardware.device=cpu or {key}=none.")


def quantization_config(kind: str | None, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for int8 | nf4 | fp4 (inference) or 8bit | 4bit (QLoRA: NF4 + double quant)."""
    if not kind or kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind in ("8bit", "int8"):
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if kind == "fp4" else "nf4",
                              bnb_4bit_use_double_quant=kind == "4bit", bnb_4bit_compute_dtype=dtype)


def load_model(path: str, placement: Placement, quantization: str | None = None, trust_remote_code: bool = False,
               revision: str | None = None, rope_scaling: dict | None = None, adapter: str | None = None):
    """`rope_scaling` ({"type", "factor"}: medgpt.modeling.rope) is applied to the config before the weights load;
    `adapter`: the adapter folder the model is the base of, whose medgpt_base.json (RoPE scaling, resized vocabulary:
    medgpt.modeling.vocab) is applied so the base has the shape the adapter trained on."""
    from transformers import AutoModelForCausalLM

    from medgpt.modeling.rope import scaled_config
    from medgpt.modeling.vocab import apply_base_changes, read_base_changes

    changes = read_base_changes(adapter)
    rope_scaling = rope_scaling or changes.get("rope_scaling")
    kwargs = dict(dtype=placement.dtype, attn_implementation=placement.attn_implementation, trust_remote_code=trust_remote_code)
    if rope_scaling:
        kwargs["config"] = scaled_config(path, rope_scaling, trust_remote_code, revision)
    quantization = None if quantization == "none" else quantization
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization, placement.dtype)
        kwargs["device_map"] = {"": 0} if placement.device == "cuda" else {"": placement.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the model from {path}: {e}") from None
    apply_base_changes(model, changes)
    if not quantization:
        model.to(placement.device)
    log.info("model: %s (%.1fM parameters, %s, %s, %s attention)", path, model.num_parameters() / 1e6, placement.device,
             str(placement.dtype).removeprefix("torch."), placement.attn_implementation)
    return model
