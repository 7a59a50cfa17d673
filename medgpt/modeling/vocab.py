"""Vocabulary extension (`model.add_tokens=[...]`, `model.add_tokens_file=<path>`): new tokens and their embedding rows.

Supports: tokens from the list and/or a UTF-8 file with one token per line (blank lines ignored, each line
stripped; a relative path is read from the project root), added to the tokenizer as ordinary (not special)
tokens before the data is tokenised, so the training data already uses them. The embedding matrix is resized
to the new vocabulary (only when the tokenizer outgrows it: models whose matrix has spare rows keep their
size) and each new row starts as the mean of the rows of the sub-tokens the old tokenizer split the token
into; an untied output matrix gets the same mean of its own rows. With an adapter, only the new rows train:
PEFT's `trainable_token_indices` (in the pinned peft >= 0.17; checked on 0.21), which keeps a tied lm_head tied to the embedding (both read
the same trained rows) and stores just those rows in the adapter. `lora.modules_to_save=[embed_tokens, ...]`
trains the whole matrices instead (every row changes, and the adapter holds them in full). Full fine-tuning
(lora=none) trains every weight, new rows included.

Skipped, with a warning naming them: tokens that are already one token of the vocabulary (a word the
tokenizer already has, or tokens added by an earlier run this one starts from: a pt -> sft chain repeats
`model.add_tokens` harmlessly); duplicates count once. Refused in one sentence: a missing or empty tokens
file (named), an empty token.

Written beside an adapter: `medgpt_base.json` (BASE_CHANGES) with the resized vocabulary size, each new
row's sub-tokens and the RoPE scaling (medgpt.modeling.rope), so the base model an adapter is applied to
(merge, serving: loader.load_model(..., adapter=...)) is reshaped exactly as in training. PEFT on its own
would store both resized matrices in every adapter (its "auto" save_embedding_layers: 2 x vocab x hidden,
~56.6M parameters on SmolLM2-135M); the adapter's save_pretrained saves without them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from medgpt.errors import ConfigError

log = logging.getLogger(__name__)

BASE_CHANGES = "medgpt_base.json"  # beside an adapter: how its base model was reshaped for training


def requested_tokens(model_cfg, root: str | Path) -> list[str]:
    """The tokens `model.add_tokens` and `model.add_tokens_file` ask for, in order (the list first)."""
    tokens = [str(t) for t in (model_cfg.get("add_tokens") or [])]
    if any(not t.strip() for t in tokens):
        raise ConfigError("model.add_tokens holds an empty token: every entry must contain a character other than whitespace.")
    name = model_cfg.get("add_tokens_file")
    if name:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else Path(root) / path
        if not path.is_file():
            raise ConfigError(f"model.add_tokens_file={name}: {path} does not exist or is not a file (one token per line).")
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        from_file = [line for line in lines if line]
        if not from_file:
            raise ConfigError(f"model.add_tokens_file={name}: {path} holds no tokens (one token per line, blank lines ignored).")
        tokens += from_file
    return tokens


def extend_tokenizer(tokenizer, tokens: list[str]) -> dict[int, list[int]]:
    """Add the new `tokens` to `tokenizer` (in place); returns {new id: the ids the tokenizer split it into before}."""
    vocab = tokenizer.get_vocab()
    fresh, present = {}, []
    for token in dict.fromkeys(tokens):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token in vocab or (len(ids) == 1 and tokenizer.decode(ids) == token):
            present.append(token)
        else:
            fresh[token] = ids
    if present:
        shown = ", ".join(repr(t) for t in present[:10]) + (f" and {len(present) - 10} more" if len(present) > 10 else "")
        log.warning("model.add_tokens: %d already one token of the vocabulary, skipped: %s", len(present), shown)
    if not fresh:
        return {}
    tokenizer.add_tokens(list(fresh))
    added = {tokenizer.convert_tokens_to_ids(token): ids for token, ids in fresh.items()}
    log.info("vocabulary: %d tokens added (ids %d..%d), %d in all", len(added), min(added), max(added), len(tokenizer))
    return added


def add_token_rows(model, vocab_size: int, new_rows: dict[int, list[int]]) -> None:
    """Resize the embeddings to `vocab_size` rows (when larger) and start each new row as the mean of its sub-token rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # keeps tied weights tied; rows are set below
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings()
    matrices = [inputs] + ([outputs.weight] if outputs is not None and not _tied(model) else [])
    with torch.no_grad():
        for weight in matrices:
            for new_id, sub_ids in new_rows.items():
                weight[int(new_id)] = weight[list(sub_ids)].float().mean(0).to(weight.dtype)


def _tied(model) -> bool:
    outputs = model.get_output_embeddings()
    return outputs is not None and outputs.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def trainable_rows(model, token_ids: list[int]) -> dict[str, list[int]]:
    """PEFT's `trainable_token_indices` for the new rows: the input embedding (a tied lm_head follows it), and an
    untied output matrix as well."""
    ids = sorted(int(i) for i in token_ids)
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    out = {names[model.get_input_embeddings()]: ids}
    if model.get_output_embeddings() is not None and not _tied(model):
        out[names[model.get_output_embeddings()]] = ids
    return out


def record_base_changes(peft_model, changes: dict) -> None:
    """Make the adapter's save_pretrained (the Trainer's checkpoints and final save) write BASE_CHANGES and leave the
    resized embedding matrices out (they are the base's, reproduced by `apply_base_changes`)."""
    save = peft_model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        kwargs.setdefault("save_embedding_layers", False)
        save(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            (Path(save_directory) / BASE_CHANGES).write_text(json.dumps(changes, indent=1) + "\n")

    peft_model.save_pretrained = save_pretrained


def base_changes(vocab_size: int | None, new_rows: dict[int, list[int]], rope: dict | None) -> dict:
    return {"vocab_size": vocab_size, "new_token_rows": {str(k): v for k, v in new_rows.items()}, "rope_scaling": rope}


def read_base_changes(adapter: str | Path | None) -> dict:
    """What BASE_CHANGES in the adapter folder says ({} for an adapter trained without them)."""
    path = Path(adapter) / BASE_CHANGES if adapter else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def apply_base_changes(model, changes: dict) -> None:
    """Reshape a freshly loaded base model's vocabulary as training did (RoPE scaling is applied at load instead)."""
    if changes.get("vocab_size"):
        add_token_rows(model, int(changes["vocab_size"]), {int(k): v for k, v in changes.get("new_token_rows", {}).items()})
