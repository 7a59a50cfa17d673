"""Supervised fine-tuning (method=sft).

Supports: ShareGPT, OpenAI-messages and Alpaca dialogues (multi-turn, system prompts, data.columns
renaming); loss on assistant turns only (method.train_on_inputs=true adds the prompts); truncation
that keeps whole turns and the final end-of-turn token; optional packing (method.packing) with
per-example position ids; LoRA / DoRA / QLoRA adapters or full fine-tuning (lora=none); DeepSpeed
ZeRO through the Trainer; eval loss and perplexity on held-out data before and after training; the
answers of the untuned and the tuned model to held-out questions (method.sample_questions).
Refuses: plain-text or preference data (use method=pt or method=dpo).

Writes: metrics.jsonl, plots/loss.png, adapter/ or model/ (tokenizer + chat template), summary.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from medgpt.data.collate import PadCollator
from medgpt.data.sft_data import build_sft_data
from medgpt.modeling.generate import generate_answers
from medgpt.registry import register
from medgpt.stages.training import (
    build_model,
    evaluate,
    finish_plots,
    make_trainer,
    plan,
    prepare,
    save_artefacts,
    stop_token_ids,
)

log = logging.getLogger(__name__)


@register("sft")
def sft(cfg: DictConfig, run_dir: Path) -> dict:
    # --- setup: tokenizer and template first (the data needs them), then data, then the model ---
    setup = prepare(cfg)
    data = build_sft_data(cfg, setup.tokenizer, setup.template)
    model = build_model(cfg, setup)
    collator = PadCollator(setup.tokenizer.pad_token_id)
    trainer = make_trainer(cfg, run_dir, setup, model, data.train, data.eval, collator)
    estimate = plan(cfg, len(data.train), data.stats["train"]["tokens"])
    log.info("plan: %d optimiser steps x %d sequences, ~%d tokens", estimate["optimizer_steps"], estimate["sequences_per_step"],
             estimate["planned_tokens"])

    # --- before: held-out loss and answers of the untuned model ---
    questions = [r.messages[:-1] for r in data.eval_records[: cfg.method.sample_questions]]
    stop_ids = stop_token_ids(setup.tokenizer, setup.template)
    answer = lambda: generate_answers(trainer.model, setup.tokenizer, setup.template, questions,  # noqa: E731
                                      cfg.method.sample_max_new_tokens, stop_ids) if questions else []
    before_eval, before_answers = evaluate(trainer), answer()

    # --- train ---
    started = time.time()
    result = trainer.train()
    train_seconds = time.time() - started

    # --- after: held-out loss and answers of the tuned model, then save ---
    after_eval, after_answers = evaluate(trainer), answer()
    artefact = save_artefacts(run_dir, trainer.model, setup.tokenizer, setup.template, cfg)
    finish_plots(run_dir, f"{cfg.method.name} · {cfg.model.name} · {cfg.data.name}")

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    samples = [{"question": q[-1]["content"], "reference": r.messages[-1]["content"], "before": b, "after": a}
               for q, r, b, a in zip(questions, data.eval_records, before_answers, after_answers)]
    return {
        "stage": "sft",
        "model": cfg.model.name_or_path,
        "base_model_path": setup.model_path,  # the folder the adapter applies to (serving loads it from here)
        "template": setup.template.name,
        "adapter": cfg.lora.name,
        "artefact": artefact.name,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_mean": result.training_loss,
        "eval_loss_before": before_eval.get("eval_loss"),
        "eval_loss": after_eval.get("eval_loss"),
        "eval_perplexity": after_eval.get("eval_perplexity"),
        "tokens_seen": tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
        "data": {**data.stats, "cache_hit": data.cache_hit},
        "plan": estimate,
        "samples": samples,
    }
