"""Greedy answers for a few prompts, batched with left padding (used for before/after samples)."""

from __future__ import annotations

import torch

from medgpt.data.templates import Template


@torch.no_grad()
def generate_answers(model, tokenizer, template: Template, conversations: list[list[dict]], max_new_tokens: int,
                     stop_ids: list[int], batch_size: int = 8) -> list[str]:
    """One greedy answer per conversation (each ending with a user turn), rendered with `template`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [tokenizer(template.render(c, bos, eos, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for c in chunk]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=pad, use_cache=True)
        for row in out[:, width:]:
            ids = row.tolist()
            cut = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
            answers.append(tokenizer.decode(ids[:cut], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
