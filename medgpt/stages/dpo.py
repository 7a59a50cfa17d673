"""Preference optimisation (method=dpo): DPO, IPO, hinge, robust/cDPO, and the reference-free ORPO and SimPO.

Supports: preference data as `conversations`/`messages` + `chosen` + `rejected`, and MedicalGPT's flat
form (`system`, `history`, `question`, `response_chosen`, `response_rejected`); multi-turn prompts
rendered through the template; loss on the final response tokens only (earlier turns are prompt);
prompts longer than `method.max_prompt_length` cut from the left (counted); pairs with chosen ==
rejected dropped (counted). `method.loss`, `method.beta`, `method.label_smoothing`, `method.sft_weight`.
Reference (`method.reference`): auto — the starting policy: with a LoRA adapter that is the policy with
its adapter disabled (no second copy in memory; after `model.init_from=<SFT run>` that is the SFT
policy, never silently the base), with full fine-tuning a frozen copy; base — the pretrained model at
the root of the chain; <run dir> — that run's policy, frozen. `method.precompute_reference` computes
reference log-probs once before training. The choice is recorded in summary.json.
Metrics per step: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*.
Interrupted (SIGINT/SIGTERM) or stopped by the loss watchdog: a checkpoint in checkpoints/ (resume=true continues).
Refuses: dialogue or plain-text data (use method=sft or method=pt).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgpt.data.collate import PreferenceCollator
from medgpt.data.dpo_data import build_dpo_data
from medgpt.modeling.loader import load_model
from medgpt.registry import register
from medgpt.stages.preference import REFERENCE_FREE, PreferenceTrainer, Reference, frozen_copy
from medgpt.stages.training import (
    Setup,
    build_model,
    common_summary,
    finish_plots,
    make_trainer,
    plan,
    prepare,
    resume_checkpoint,
    save_artefacts,
    stop_if_interrupted,
)
from medgpt.tracking.rundir import resolve_run

log = logging.getLogger(__name__)
REPORTED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected")


def choose_reference(cfg: DictConfig, setup: Setup, policy) -> Reference:
    m = cfg.method
    if m.loss in REFERENCE_FREE:
        return Reference("none", f"method.loss={m.loss} is reference-free")
    start = f"run {setup.init_from}" if setup.init_from else f"the base model {setup.model_path}"
    if m.reference == "auto" or (m.reference == "base" and not setup.init_from):
        if cfg.lora.name != "none":
            return Reference("adapter-disabled", f"the starting policy ({start}): the policy with its LoRA adapter disabled")
        return Reference("frozen", f"a frozen copy of the starting policy ({start})", frozen_copy(policy))
    if m.reference == "base":
        path, what = setup.root_model_path, f"the base model {setup.root_model_path} (not the starting run {setup.init_from})"
    else:
        from medgpt.stages.merge import ensure_full_model

        run = resolve_run(m.reference, Path(cfg.paths.output_dir))
        path = str(ensure_full_model(run))
        what = f"the policy of run {run} ({path})"
    model = load_model(path, setup.placement, cfg.lora.quantization, cfg.model.trust_remote_code).eval()
    model.requires_grad_(False)
    return Reference("frozen", what, model)


@torch.no_grad()
def precompute_reference(reference: Reference, policy, dataset, collator, batch_size: int):
    """Adds ref_chosen_logps / ref_rejected_logps columns, so training needs no reference forward passes."""
    device = next(policy.parameters()).device
    chosen, rejected = [], []
    policy.eval()
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        c, r = reference.logps(policy, {k: v.to(device) for k, v in batch.items()})
        chosen += c.tolist()
        rejected += r.tolist()
    policy.train()
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def preference_eval(trainer) -> dict:
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {k: metrics[k] for k in REPORTED if k in metrics}


@register("dpo")
def dpo(cfg: DictConfig, run_dir: Path) -> dict:
    m = cfg.method
    # --- setup: tokenizer and template, pairs, policy, then the reference model ---
    setup = prepare(cfg)
    data = build_dpo_data(cfg, setup.tokenizer, setup.template)
    model = build_model(cfg, setup)
    reference = choose_reference(cfg, setup, model)
    log.info("reference: %s", reference.description)
    collator = PreferenceCollator(setup.tokenizer.pad_token_id)
    train_ds, eval_ds = data.train, data.eval
    if m.precompute_reference and reference.kind != "none":
        log.info("precomputing reference log-probs for %d + %d pairs", len(train_ds), len(eval_ds or []))
        train_ds = precompute_reference(reference, model, train_ds, collator, cfg.hardware.eval_batch_size)
        eval_ds = precompute_reference(reference, model, eval_ds, collator, cfg.hardware.eval_batch_size) if eval_ds else None
        reference.model = None  # no longer needed: free its memory
    trainer = make_trainer(cfg, run_dir, setup, model, train_ds, eval_ds, collator, trainer_cls=PreferenceTrainer,
                           method=m, reference=reference)
    estimate = plan(cfg, len(train_ds), data.stats["train"]["tokens"], trainer.model)
    log.info("plan: %d optimiser steps x %d pairs", estimate["optimizer_steps"], estimate["sequences_per_step"])

    # --- train, with held-out loss and reward accuracy before and after (resume=true: from the last checkpoint) ---
    before = preference_eval(trainer)
    started = time.time()
    trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, run_dir))
    train_seconds = time.time() - started
    stop_if_interrupted(trainer, cfg, run_dir)  # a signal or the loss watchdog: checkpoint saved, no final eval or save
    after = preference_eval(trainer)

    # --- save ---
    artefact = save_artefacts(run_dir, trainer.model, setup.tokenizer, setup.template, cfg)
    finish_plots(run_dir, f"dpo ({m.loss}) · {cfg.model.name} · {cfg.data.name}")
    summary = common_summary(cfg, setup, trainer, before, after, train_seconds, artefact, data)
    summary.pop("eval_perplexity")
    return {**summary, "loss": m.loss, "beta": m.beta,
            "reference": {**reference.as_dict(), "precomputed": bool(m.precompute_reference and reference.kind != "none")},
            "eval_reward_accuracy_before": before.get("eval_rewards/accuracies"),
            "eval_reward_accuracy": after.get("eval_rewards/accuracies"),
            "eval_reward_margin": after.get("eval_rewards/margins"), "plan": estimate}
