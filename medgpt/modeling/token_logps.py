"""Log-probabilities of the labelled tokens only: the LM head and the softmax run where a label is, in chunks.

A causal LM's own loss computes `batch × length × vocab` logits, upcasts them to fp32 and takes the cross-entropy
at every position, prompt and padding included; its backward keeps the fp32 logits, the log-softmax and their
gradient (for SmolLM2 at batch 4 × 512 that is 4 × 400 MB). Here the decoder's last hidden state is taken from the
model's own forward (a hook on `get_decoder()`, the forward itself asked for `logits_to_keep=1`, so DDP and PEFT
see a normal call), the positions that carry a label are selected, and `LabelledLogps` computes their log-probs
chunk by chunk. Because the head's weight is frozen (every adapter method here; the embeddings are tied and
frozen), the gradient with respect to the hidden state, `(onehot − softmax) · W`, is computed in the same pass and
kept (labelled × hidden), so no logits outlive their chunk and the backward is one multiply. This is the fused
linear cross-entropy of Liger-Kernel (Hsu et al. 2024) and Apple's cut cross-entropy, whose kernels are Triton/CUDA
only; this one is plain torch and runs on the CPU too.

Supports: decoder-only models whose logits are `lm_head(hidden)` with nothing after it (PLAIN_HEAD model types),
a frozen head, DDP, LoRA/QLoRA/DoRA, fp32 or bf16 autocast. Refuses (the caller falls back to the full-logits
path; `fallback_reason` says why): a trainable head (full fine-tuning), logit soft-capping or scaling (other model
types), FSDP and ZeRO-3 (the head's weight is sharded outside the forward; decided by the trainer).
Equal to the full-logits loss up to float summation order (tests/test_token_logps.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from medgpt.data.tokenize import IGNORE

# model types whose causal-LM logits are exactly lm_head(last hidden state): no soft-capping, scaling or router loss
PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "starcoder2", "stablelm", "granite_dense"})
CHUNK_ELEMENTS = 1 << 25  # logits held at once: 32M fp32 values (128 MB); for a 49k vocabulary ~680 positions per chunk


class LabelledLogps(torch.autograd.Function):
    """log softmax(hidden · Wᵀ + b)[target] for N positions, chunked; the gradient w.r.t. hidden is made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        n = hidden.shape[0]
        wide = torch.promote_types(hidden.dtype, torch.float32)  # the softmax runs in fp32 at least, as the full path's .float()
        out = torch.empty(n, dtype=wide, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        rows = torch.arange(min(chunk, n), device=hidden.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            t = targets[start:stop]
            logits = F.linear(hidden[start:stop], weight, bias).to(wide)  # under autocast: the same bf16 matmul as the model's head
            lse = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(1, t.unsqueeze(1)).squeeze(1) - lse
            if grad is not None:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs[rows[: stop - start], t] -= 1.0  # softmax − onehot = −d logp / d logits
                grad[start:stop] = -(probs.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1).to(grad.dtype), None, None, None, None


def unwrap(model):
    """The transformers model under DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def fallback_reason(model) -> str | None:
    """Why the labelled-positions path cannot serve `model` (None: it can)."""
    inner = unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD:
        return f"model type {model_type!r} is not known to compute its logits as a plain linear head"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(inner, "get_decoder"):
        return "the model has no plain linear output head"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "the output head trains (full fine-tuning)"
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return "the model's forward has no logits_to_keep"
    return None


def hidden_states(model, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden state (batch × length × hidden) from one forward of `model` (wrappers included)."""
    inner = unwrap(model)
    captured = []

    def keep(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = inner.get_decoder().register_forward_hook(keep)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)  # the head runs on one position only
    finally:
        handle.remove()
    return captured[-1]


def labelled_logps(model, inputs: dict, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each labelled token [N], the row it belongs to [N]); position t predicts labels[:, t + 1]."""
    hidden = hidden_states(model, inputs)[:, :-1]
    targets = labels[:, 1:]
    where = targets != IGNORE
    head = unwrap(model).get_output_embeddings()
    chunk = max(1, chunk_elements // head.weight.shape[0])
    logps = LabelledLogps.apply(hidden[where], head.weight, head.bias, targets[where], chunk)
    return logps, where.nonzero()[:, 0]


def sequence_logps(model, inputs: dict, labels: torch.Tensor, labelled_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens, and how many tokens were labelled.

    `labelled_only=False` (or a model `fallback_reason` names) computes the model's full logits instead.
    """
    if labelled_only and fallback_reason(model) is None:
        logps, rows = labelled_logps(model, inputs, labels)
        sums = torch.zeros(labels.shape[0], dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
        return sums, (labels[:, 1:] != IGNORE).sum(-1)
    return sequence_logps_from_logits(model(**inputs, use_cache=False).logits, labels)


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-logits reference: fp32 log-softmax over the whole vocabulary at every position."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (picked * mask).sum(-1), mask.sum(-1)
