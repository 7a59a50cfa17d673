"""Summed log-probabilities of continuations given a prompt, batched, with the prompt computed once.

For each prompt p and each of its continuations c = (c1 .. cm):

    loglik(c | p) = sum_j log softmax(model(p + c[:j-1]))[c_j]

computed in two forward passes per batch of prompts:
  1. the prompts, left-padded into one batch, with the KV cache kept: the last position's logits give
     log p(c1 | p) for every continuation of that prompt (a one-token continuation, e.g. an option
     letter, needs nothing more);
  2. every continuation longer than one token, as one row each, right-padded, on top of its prompt's
     cache rows (the cache is copied per continuation with `batch_select_indices`): the prompt is
     shared, never recomputed. Models whose cache cannot be indexed that way get the plain fallback:
     one row per continuation holding prompt + continuation.
Positions follow the real tokens (padding takes none), as the serving engine does.
"""

from __future__ import annotations

import inspect

import torch


def _cache_kw(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x renamed it


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] without materialising the full log-softmax (vocabularies are large)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def continuation_logliks(model, prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int) -> list[list[float]]:
    """Summed log-probabilities, one list per prompt with one value per continuation (each continuation non-empty)."""
    if any(not c for conts in continuations for c in conts):
        raise ValueError("every continuation needs at least one token")
    device = next(model.parameters()).device
    kw = _cache_kw(model)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}  # the last position only
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    cache = getattr(out, kw, None) or getattr(out, "past_key_values", None)
    first = out.logits[:, -1, :].float().log_softmax(-1)  # log p(next token | prompt)
    scores = [[float(first[i, c[0]]) for c in conts] for i, conts in enumerate(continuations)]
    longer = [(i, j) for i, conts in enumerate(continuations) for j, c in enumerate(conts) if len(c) > 1]
    if not longer:
        return scores
    if cache is not None and hasattr(cache, "batch_select_indices"):
        rest = _on_cache(model, kw, cache, mask, continuations, longer, pad_id)
    else:
        rest = _without_cache(model, prompts, continuations, longer, pad_id)
    for (i, j), value in zip(longer, rest):
        scores[i][j] += value
    return scores


def _on_cache(model, kw: str, cache, prompt_mask: torch.Tensor, continuations, longer, pad_id: int) -> list[float]:
    """Pass 2 on copies of the prompts' cache rows: log p(c2..cm | p, c1..)."""
    device = prompt_mask.device
    rows = torch.tensor([i for i, _ in longer], device=device)
    cache.batch_select_indices(rows)  # one cache row per continuation (rows repeat when a prompt has several)
    inputs = [continuations[i][j][:-1] for i, j in longer]
    targets = [continuations[i][j][1:] for i, j in longer]
    span = max(map(len, inputs))
    ids = torch.tensor([x + [pad_id] * (span - len(x)) for x in inputs], device=device)
    own = torch.tensor([[1] * len(x) + [0] * (span - len(x)) for x in inputs], device=device)
    mask = torch.cat([prompt_mask[rows], own], dim=1)
    positions = prompt_mask[rows].sum(-1, keepdim=True) + torch.arange(span, device=device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache}).logits
    return _sum_targets(logits, targets, device, pad_id)


def _without_cache(model, prompts, continuations, longer, pad_id: int) -> list[float]:
    """Fallback pass 2: one left-padded row of prompt + continuation[:-1] per continuation."""
    device = next(model.parameters()).device
    rows = [prompts[i] + continuations[i][j][:-1] for i, j in longer]
    targets = [continuations[i][j][1:] for i, j in longer]
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    span = max(map(len, targets))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -span:, :]
    # right-align the targets with the last `span` positions (left padding puts every row's end there)
    aligned = [[pad_id] * (span - len(t)) + t for t in targets]
    lp = _token_logprobs(logits, torch.tensor(aligned, device=device))
    valid = torch.tensor([[0] * (span - len(t)) + [1] * len(t) for t in targets], device=device, dtype=lp.dtype)
    return (lp * valid).sum(-1).tolist()


def _sum_targets(logits: torch.Tensor, targets: list[list[int]], device, pad_id: int) -> list[float]:
    span = logits.shape[1]
    padded = torch.tensor([t + [pad_id] * (span - len(t)) for t in targets], device=device)
    valid = torch.tensor([[1] * len(t) + [0] * (span - len(t)) for t in targets], device=device)
    lp = _token_logprobs(logits, padded)
    return (lp * valid.to(lp.dtype)).sum(-1).tolist()
