"""The one lifecycle every training method runs (the stage protocol: medgpt.stages.protocol).

    prepare -> data -> model -> Trainer -> before-eval (+ samples) -> train -> after-eval (+ samples)
    -> save -> plot -> summary

A method only declares what differs (its `Stage`); this function reads top to bottom like a
torchtune recipe. Interrupted (SIGINT/SIGTERM) or stopped by the loss watchdog, a run ends after the
train step with a checkpoint (`resume=true` continues it) and no final eval or save.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medgpt.data.collate import PadCollator
from medgpt.data.formats import accepts
from medgpt.data.loading import data_format
from medgpt.errors import DataError
from medgpt.modeling.loader import DTYPES
from medgpt.stages.protocol import Stage, TrainingParts, method_for_format
from medgpt.stages.training import (
    Setup,
    build_model,
    evaluate_before_training,
    evaluate_lm,
    finish_plots,
    make_trainer,
    peak_memory_gb,
    plan,
    prepare,
    resume_checkpoint,
    save_artefacts,
    stop_if_interrupted,
)
from medgpt.tracking.guards import EarlyStopping
from medgpt.tracking.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What the lifecycle has built so far; every hook gets it."""

    cfg: DictConfig
    run: RunDir
    stage: Stage
    setup: Setup | None = None
    data: Any = None  # medgpt.data.loading.StageData
    model: Any = None
    parts: TrainingParts | None = None
    trainer: Any = None
    plan: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)  # held-out metrics before training
    after: dict = field(default_factory=dict)
    samples_before: list = field(default_factory=list)
    samples_after: list = field(default_factory=list)
    train_result: Any = None
    train_seconds: float = 0.0
    artefact: Path | None = None


def run_stage(stage: Stage, cfg: DictConfig, run: RunDir) -> dict:
    ctx = Context(cfg, run, stage)
    # --- setup: placement, tokenizer and template first (the data needs them), then data, model and Trainer ---
    ctx.setup = prepare(cfg)
    check_data_format(cfg, stage)
    with main_process_first():  # several ranks: rank 0 tokenises into the cache, the others then read it
        ctx.data = stage.build_data(ctx)
    ctx.model = stage.build_model(ctx) if stage.build_model else build_model(cfg, ctx.setup)
    ctx.parts = stage.training_parts(ctx) if stage.training_parts else language_model_parts(ctx)
    ctx.trainer = make_trainer(cfg, run, ctx.setup, ctx.model, ctx.parts, perplexity=stage.perplexity)
    ctx.plan = plan(cfg, len(ctx.parts.train), ctx.data.stats["train"]["tokens"], ctx.trainer.model)
    log.info("plan: %d optimiser steps x %d sequences, ~%d tokens", ctx.plan["optimizer_steps"], ctx.plan["sequences_per_step"],
             ctx.plan["planned_tokens"])
    evaluate = stage.evaluate or evaluate_lm

    # --- before: held-out metrics (and answers) of the starting model ---
    ctx.before = evaluate_before_training(ctx.trainer, evaluate)  # several ranks: leaves the model for train() to wrap
    ctx.samples_before = stage.samples(ctx) if stage.samples else []

    # --- train (resume=true continues from the run's last checkpoint) ---
    started = time.time()
    ctx.train_result = ctx.trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, run))
    ctx.train_seconds = time.time() - started
    stop_if_interrupted(ctx.trainer, cfg, run)  # a signal or the loss watchdog: checkpoint saved, no final eval or save

    # --- after: held-out metrics (and answers) of the trained model, then save and plot ---
    ctx.after = evaluate(ctx.trainer)
    ctx.samples_after = stage.samples(ctx) if stage.samples else []
    ctx.artefact = save_artefacts(run, ctx.trainer, ctx.setup.tokenizer, ctx.setup.template, cfg)
    finish_plots(run, f"{stage.name} · {cfg.model.name} · {cfg.data.name}")
    return {**common_summary(ctx), **(stage.summary(ctx) if stage.summary else {})}


def check_data_format(cfg: DictConfig, stage: Stage) -> None:
    """Refuse data the method cannot train on, naming the file and the method that can."""
    fmt, where = data_format(cfg.data, Path(cfg.paths.root))
    if not accepts(stage.formats, fmt):  # by name, or a registered format of the same kind (medgpt.data.formats)
        other = method_for_format(fmt)
        raise DataError(f"{where}: holds {fmt} data, but method={stage.name} needs {' or '.join(stage.formats)} data; "
                        + (f"use method={other} or another data file." if other else "use another data file."))


def language_model_parts(ctx: Context) -> TrainingParts:
    """The default: the stage's splits, padded batches, the plain Trainer (causal-LM loss on the labels)."""
    return TrainingParts(ctx.data.train, ctx.data.eval, PadCollator(ctx.setup.tokenizer.pad_token_id))


def main_process_first():
    """A context in which rank 0 runs first and the other ranks wait at a barrier (one process: nothing to wait for)."""
    import contextlib
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def mean_train_loss(history: list[dict]) -> float | None:
    """The mean training loss over every step, also across a resume (the Trainer's own figure covers only the
    steps since): each logged loss is the mean over the steps since the previous log, so weight it by them."""
    total = steps = 0.0
    previous = 0
    for row in history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else None


def common_summary(ctx: Context) -> dict:
    """summary.json fields every training method reports (medgpt.tracking.rundir.RunSummary)."""
    cfg, setup, trainer = ctx.cfg, ctx.setup, ctx.trainer
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    from medgpt.data.templates import stop_token_ids

    return {
        "stage": ctx.stage.name,
        "model": cfg.model.name_or_path,
        "init_from": setup.init_from,
        "base_model_path": setup.model_path,
        "root_model_path": setup.root_model_path,
        "dtype": next(k for k, v in DTYPES.items() if v == setup.placement.dtype),
        "template": setup.template.name,
        "stop_token_ids": stop_token_ids(setup.tokenizer, setup.template),
        "adapter": cfg.lora.name,
        "artefact": ctx.artefact.name if ctx.artefact else None,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_mean": mean_train_loss(trainer.state.log_history),
        "eval_loss_before": ctx.before.get("eval_loss"),
        "eval_loss": ctx.after.get("eval_loss"),
        "eval_perplexity": ctx.after.get("eval_perplexity") if ctx.stage.perplexity else None,
        "tokens_seen": tokens,
        "train_seconds": round(ctx.train_seconds, 2),
        "tokens_per_s": round(tokens / ctx.train_seconds, 1) if ctx.train_seconds else None,
        "peak_memory_gb": peak_memory_gb(),
        "early_stopped_at_step": next((c.stopped_at for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStopping)), None),
        "world_size": trainer.args.world_size,
        "data": {**ctx.data.stats, "cache_hit": ctx.data.cache_hit},
        "plan": ctx.plan,
    }
