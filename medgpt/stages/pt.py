"""Continued pretraining (method=pt).

Supports: `.txt` files (one document per line) and `.jsonl`/`.json` with a `text` field; documents
end with the eos token and are packed into `method.max_length` blocks with per-document position ids
(attention never crosses documents, and a document's first token is never predicted from the one
before); the last partial block is padded with pads out of the loss (`method.drop_last_block=true`
drops it). With `method.packing=false` each document is its own row and every pad position is
excluded from the loss. LoRA / QLoRA / full fine-tuning, `model.init_from`, eval loss and perplexity
before and after.
Refuses: dialogue or preference data (use method=sft or method=dpo).

Writes: metrics.jsonl, plots/loss.png, adapter/ or model/ (tokenizer + chat template), summary.json;
checkpoints/ when interrupted (SIGINT/SIGTERM) or stopped by the loss watchdog (resume=true continues).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from medgpt.data.collate import PadCollator
from medgpt.data.pt_data import build_pt_data
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


@register("pt")
def pt(cfg: DictConfig, run_dir: Path) -> dict:
    # --- setup: tokenizer and template, then data (packed blocks), then the model ---
    setup = prepare(cfg)
    data = build_pt_data(cfg, setup.tokenizer, setup.template)
    model = build_model(cfg, setup)
    trainer = make_trainer(cfg, run_dir, setup, model, data.train, data.eval, PadCollator(setup.tokenizer.pad_token_id))
    estimate = plan(cfg, len(data.train), data.stats["train"]["tokens"], trainer.model)
    log.info("plan: %d optimiser steps x %d blocks of %d tokens", estimate["optimizer_steps"], estimate["sequences_per_step"],
             cfg.method.max_length)

    # --- train, with held-out loss before and after (resume=true continues from the run's last checkpoint) ---
    before = evaluate(trainer)
    started = time.time()
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, run_dir))
    train_seconds = time.time() - started
    stop_if_interrupted(trainer, cfg, run_dir)  # a signal or the loss watchdog: checkpoint saved, no final eval or save
    after = evaluate(trainer)

    # --- save ---
    artefact = save_artefacts(run_dir, trainer.model, setup.tokenizer, setup.template, cfg)
    finish_plots(run_dir, f"pt · {cfg.model.name} · {cfg.data.name}")
    return {**common_summary(cfg, setup, trainer, before, after, train_seconds, artefact, data), "plan": estimate}
