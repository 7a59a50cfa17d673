"""Supervised fine-tuning (method=sft).

Supports: ShareGPT, OpenAI-messages and Alpaca dialogues (multi-turn, system prompts, data.columns
renaming); loss on assistant turns only (method.train_on_inputs=true adds the prompts); truncation
that keeps whole turns and the final end-of-turn token; optional packing (method.packing) with
per-example position ids; LoRA / DoRA / QLoRA adapters or full fine-tuning (lora=none); DeepSpeed
ZeRO through the Trainer; eval loss and perplexity on held-out data before and after training; the
answers of the untuned and the tuned model to held-out questions (method.sample_questions).
Refuses: plain-text or preference data (use method=pt or method=dpo).

Writes: metrics.jsonl, plots/loss.png, adapter/ or model/ (tokenizer + chat template), summary.json;
checkpoints/ when interrupted (SIGINT/SIGTERM) or stopped by the loss watchdog (resume=true continues).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from medgpt.data.collate import PadCollator
from medgpt.data.sft_data import build_sft_data
from medgpt.data.templates import stop_token_ids
from medgpt.modeling.generate import generate_answers
from medgpt.registry import register
from medgpt.stages.training import (
    build_model,
    common_summary,
    evaluate,
    finish_plots,
    make_trainer,
    plan,
    prepare,
    resume_checkpoint,
    save_artefacts,
    stop_if_interrupted,
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
    estimate = plan(cfg, len(data.train), data.stats["train"]["tokens"], trainer.model)
    log.info("plan: %d optimiser steps x %d sequences, ~%d tokens", estimate["optimizer_steps"], estimate["sequences_per_step"],
             estimate["planned_tokens"])

    # --- before: held-out loss and answers of the untuned model ---
    questions = [r.messages[:-1] for r in data.eval_records[: cfg.method.sample_questions]]
    stop_ids = stop_token_ids(setup.tokenizer, setup.template)
    answer = lambda: generate_answers(trainer.model, setup.tokenizer, setup.template, questions,  # noqa: E731
                                      cfg.method.sample_max_new_tokens, stop_ids) if questions else []
    before_eval, before_answers = evaluate(trainer), answer()

    # --- train (resume=true continues from the run's last checkpoint) ---
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, run_dir))
    train_seconds = time.time() - started
    stop_if_interrupted(trainer, cfg, run_dir)  # a signal or the loss watchdog: checkpoint saved, no final eval or save

    # --- after: held-out loss and answers of the tuned model, then save ---
    after_eval, after_answers = evaluate(trainer), answer()
    artefact = save_artefacts(run_dir, trainer.model, setup.tokenizer, setup.template, cfg)
    finish_plots(run_dir, f"{cfg.method.name} · {cfg.model.name} · {cfg.data.name}")

    samples = [{"question": q[-1]["content"], "reference": r.messages[-1]["content"], "before": b, "after": a}
               for q, r, b, a in zip(questions, data.eval_records, before_answers, after_answers)]
    return {**common_summary(cfg, setup, trainer, before_eval, after_eval, train_seconds, artefact, data),
            "train_loss_mean": result.training_loss, "plan": estimate, "samples": samples}
