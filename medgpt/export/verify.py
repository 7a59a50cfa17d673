"""Round-trip checks of an export: the reloaded artefact against the source model on fixed prompts.

Compares, on the same rendered prompts: the logits (largest absolute difference, and that difference relative
to the source's largest |logit|, which is what the tolerance bounds), the mean token loss of each prompt
under both models, and the greedy answers. `TOLERANCES` states the relative tolerance each type is held to
(measured on the tiny model and SmolLM2-135M, README "Quantise and deploy"; export.tolerance overrides it):
4-bit files are far coarser than 8-bit ones (SmolLM2-135M q4_0: 0.39 relative, prompt loss +0.22 nats). Greedy
answers (stopping at the stop token) and the first prompt's greedy tokens (past it) must be equal for the
8-bit-or-wider types; for 4/5-bit types they are reported, not required
(rounding may flip a near tie a few tokens in).
"""

from __future__ import annotations

import torch

from medgpt.data.templates import Template, stop_token_ids
from medgpt.modeling.generate import generate_answers

PROMPTS = [
    "What are the warning signs of a stroke?",
    "How much water should an adult drink in a day?",
    "Is a fever of 38.5 C in a two-year-old dangerous?",
    "What does a high LDL cholesterol result mean?",
    "What is the normal resting heart rate for an adult?",
    "Can I take ibuprofen and paracetamol together?",
    "What are the symptoms of type 2 diabetes?",
    "How long does a common cold usually last?",
]
TOLERANCES = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.5, "q4_0": 0.5,
              "int8": 0.1, "nf4": 0.25, "fp4": 0.3, "fp16": 5e-3, "fp32": 1e-4}
GREEDY_REQUIRED = ("f32", "f16", "bf16", "q8_0", "fp16", "fp32", "int8")


@torch.no_grad()
def probe(model, tokenizer, template: Template | None, n_prompts: int, max_new_tokens: int) -> dict:
    """What the comparison needs from one model: per-prompt logits and loss, and greedy answers."""
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:n_prompts]]
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    texts = [template.render(c, bos, eos, add_generation_prompt=True) if template else c[0]["content"] for c in conversations]
    device = next(model.parameters()).device
    logits, losses = [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        logits.append(out.logits.float().cpu()[0])
        losses.append(float(out.loss))
    answers = generate_answers(model, tokenizer, template, conversations, max_new_tokens, stop_token_ids(tokenizer, template)) \
        if template else []
    ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    # greedy tokens of the first prompt, past any stop token: an untrained model may stop at once, and that compares nothing
    tokens = model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    return {"logits": logits, "losses": losses, "answers": answers, "tokens": tokens.tolist()}


def compare(source: dict, exported: dict, kind: str, tolerance: float | None) -> dict:
    """The report's `verification` block: numbers, the tolerance used and whether the export passes."""
    diff = max(float((a - b).abs().max()) for a, b in zip(source["logits"], exported["logits"]))
    scale = max(float(a.abs().max()) for a in source["logits"])
    relative = diff / scale if scale > 0 else diff
    tol = tolerance if tolerance is not None else TOLERANCES[kind]
    greedy_equal = source["answers"] == exported["answers"] and source["tokens"] == exported["tokens"]
    greedy_required = kind in GREEDY_REQUIRED
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "prompts": len(source["logits"]),
        "max_abs_logit_diff": round(diff, 6), "source_max_abs_logit": round(scale, 4),
        "relative_logit_diff": round(relative, 6), "tolerance_relative": tol,
        "within_tolerance": relative <= tol,
        "prompt_loss_source": round(mean(source["losses"]), 5), "prompt_loss_export": round(mean(exported["losses"]), 5),
        "prompt_loss_delta": round(mean(exported["losses"]) - mean(source["losses"]), 5),
        "greedy_source": source["answers"], "greedy_export": exported["answers"],
        "greedy_tokens_source": source["tokens"], "greedy_tokens_export": exported["tokens"],
        "greedy_equal": greedy_equal, "greedy_required": greedy_required,
        "passed": relative <= tol and (greedy_equal or not greedy_required),
    }


def tokenizer_parity(source_tokenizer, exported_tokenizer, template: Template | None) -> dict:
    """Whether the tokenizer read back (e.g. from the GGUF) encodes the prompts and the special tokens like the source."""
    bos, eos = source_tokenizer.bos_token or "", source_tokenizer.eos_token or ""
    texts = [template.render([{"role": "user", "content": p}], bos, eos, add_generation_prompt=True) if template else p
             for p in PROMPTS] + ["Blood pressure 120/80 mmHg, 37.5°C, 2×500 mg — ok?"]
    same = [source_tokenizer(t, add_special_tokens=False)["input_ids"] == exported_tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts]
    return {"texts": len(texts), "encode_equal": all(same), "chat_template_equal":
            (source_tokenizer.chat_template or None) == (exported_tokenizer.chat_template or None),
            "eos_equal": source_tokenizer.eos_token_id == exported_tokenizer.eos_token_id}
