"""Write a transformers Llama-family (SmolLM2, Llama) or Qwen2 causal LM as one GGUF file, with its tokenizer.

Supports: `model_type` llama and qwen2 (the embedded SmolLM2 and the preset Qwen2.5 models); tensor types
f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 — what the `gguf` package (gguf-py, llama.cpp's own writer)
can quantise. It cannot write K-quants (q4_k_m, q5_k_m, ...): it only reads them; convert a q8_0/f16 file
with llama.cpp's `llama-quantize` for those. Refuses other architectures in one sentence listing these.

Writes the hyper-parameters llama.cpp and transformers' GGUF reader need, the tensors under GGUF names
(gguf's TensorNameMap; Llama's q/k projections in GGML's rotary layout, which transformers undoes on
reading), and the tokenizer: `tokenizer.ggml.model` gpt2 (byte-level BPE), `pre`, tokens, token types,
merges, special token ids, add_bos/add_eos and `tokenizer.chat_template` (the template training used).
Tensors whose rows do not split into whole quantisation blocks (32 values) stay f16; norms and biases f32.
The gguf package does this work (writer, names, quantisation); only the mapping choices are ours.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from medgpt.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = {"llama": "llama (SmolLM2, Llama 2/3)", "qwen2": "qwen2 (Qwen2, Qwen2.5)"}
TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# the pre-tokenizer's split pattern -> llama.cpp's name for it (tokenizer.ggml.pre); facts from the tokenizers' own files
PRE_PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def check_architecture(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED:
        raise ConfigError(f"export.format=gguf supports {' and '.join(SUPPORTED.values())} models; this model is {arch!r}: "
                          "use export.format=merged (safetensors) instead.")
    return arch


def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenisation (`tokenizer.ggml.pre`), from tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM / SmolLM2: single digits, then GPT-2 byte level
    for part in parts:
        pattern = (part.get("pattern") or {}).get("Regex")
        for name, known in PRE_PATTERNS.items():
            if pattern == known:
                return name
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise ConfigError(f"export.format=gguf: the tokenizer's pre-tokenizer ({', '.join(map(str, types))}) is not one llama.cpp "
                      "knows by name here (smollm, qwen2, llama-bpe, gpt-2): use export.format=merged.")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout -> GGML's (what llama.cpp's converter does for Llama q/k; transformers reverses it on reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(array: np.ndarray, qtype_name: str, is_matrix: bool):
    import gguf

    if not is_matrix or qtype_name == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype_name == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType[qtype_name.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _tokenizer_kv(writer, tokenizer, vocab_size: int) -> None:
    """Tokens (padded to the model's vocabulary), types, merges, special ids, add_bos/eos and the chat template."""
    import gguf

    with open(Path(tokenizer.name_or_path) / "tokenizer.json", encoding="utf-8") as fh:
        tj = json.load(fh)
    if tj["model"]["type"] != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError("export.format=gguf writes byte-level BPE tokenizers (SmolLM2, Qwen2, Llama 3); this tokenizer is "
                          f"{tj['model']['type']}: use export.format=merged.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # the model's embedding has more rows than the tokenizer has tokens (Qwen2 does)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[text].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer.name_or_path, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below from the tokenizer itself (the template training saved)
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.pad_token_id is not None and "pad" not in special.special_token_ids:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: Path, qtype: str, name: str) -> dict:
    """`model` (a transformers Llama/Qwen2 causal LM, any dtype) and `tokenizer` (saved in a folder) as the GGUF file `path`.

    Returns {"tensors": n, "types": {ggml type: count}}."""
    import gguf

    if qtype not in TYPES:
        raise ConfigError(f"export.gguf_type={qtype} is not one the gguf package can write ({', '.join(TYPES)}); it cannot "
                          "write K-quants (q4_k_m ...): write q8_0 or f16 and convert with llama.cpp's llama-quantize.")
    config = model.config
    arch = check_architecture(config)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = (getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"export.format=gguf: rope scaling {rope.get('rope_type')!r} is not written here; use export.format=merged.")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}[qtype])
    _tokenizer_kv(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight (no output.weight = tied)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"export.format=gguf: no GGUF name for the tensor {hf_name} ({arch}); use export.format=merged.")
        w = tensor.detach().float().cpu()
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            w = _permute(w, n_head)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            w = _permute(w, n_kv)
        if qtype == "bf16" and w.dim() == 2:
            data, raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
        else:
            data, raw = _tensor_data(w.numpy(), qtype, w.dim() == 2)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        counts[raw.name] = counts.get(raw.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": sum(counts.values()), "types": counts}
