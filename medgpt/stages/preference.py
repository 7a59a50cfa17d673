"""Preference losses (DPO and its variants), sequence log-probs, reference models and the trainer that uses them
(the machinery behind medgpt.stages.methods.dpo).

Losses (`method.loss`), with Δ = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r)) on summed log-probs:
  sigmoid  DPO (Rafailov et al. 2023): −log σ(βΔ)·(1−ε) − log σ(−βΔ)·ε   (ε = label_smoothing: cDPO)
  robust   robust DPO (Chowdhury et al. 2024): (−log σ(βΔ)·(1−ε) + log σ(−βΔ)·ε) / (1 − 2ε)
  hinge    SLiC (Zhao et al. 2023): max(0, 1 − βΔ)
  ipo      IPO (Azar et al. 2023): (Δ̄ − 1/(2β))², Δ̄ on per-token average log-probs
  orpo     ORPO (Hong et al. 2024), no reference: NLL(y_c) − β·log σ(log-odds(p̄_c) − log-odds(p̄_r)), p̄ = exp(mean log-prob)
  simpo    SimPO (Meng et al. 2024), no reference: −log σ(β(ℓ̄_c − ℓ̄_r) − γ), ℓ̄ = mean log-prob
`method.sft_weight` adds w·NLL(y_c) (per-token mean) to any of them. Rewards follow TRL's conventions:
β·(log π − log π_ref) with a reference, β·ℓ̄ without. rewards/accuracies counts a tie (equal rewards up to float
noise, as for every pair before training, when the policy is the reference) as half; rewards/ties is the share of
ties. ORPO's log(1 − p̄) is computed as log1mexp(ℓ̄), finite (with a finite gradient) as ℓ̄ nears 0.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import Trainer

from medgpt.modeling.loader import load_model
from medgpt.modeling.token_logps import sequence_logps
from medgpt.stages.sampling import SeededSampling
from medgpt.stages.token_loss import LabelledLoss
from medgpt.tracking.rundir import resolve_run, write_json

log = logging.getLogger(__name__)

REFERENCE_FREE = ("orpo", "simpo")


@dataclass
class LossInputs:
    chosen: torch.Tensor  # summed log-probs under the policy
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # summed log-probs under the reference (None: reference-free loss)
    ref_rejected: torch.Tensor | None = None


def preference_loss(x: LossInputs, loss: str, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0,
                    simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair metrics) for one batch of pairs."""
    eps = label_smoothing
    avg_c, avg_r = x.chosen / x.chosen_tokens, x.rejected / x.rejected_tokens
    nll = -avg_c
    if loss in REFERENCE_FREE:
        reward_c, reward_r = beta * avg_c.detach(), beta * avg_r.detach()
        scale = beta * (avg_c.abs() + avg_r.abs()).detach()
        if loss == "orpo":
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            losses = nll - beta * F.logsigmoid(log_odds)
        else:
            z = beta * (avg_c - avg_r) - simpo_gamma
            losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    else:
        delta = (x.chosen - x.rejected) - (x.ref_chosen - x.ref_rejected)
        reward_c, reward_r = beta * (x.chosen - x.ref_chosen).detach(), beta * (x.rejected - x.ref_rejected).detach()
        scale = beta * (x.chosen.abs() + x.ref_chosen.abs() + x.rejected.abs() + x.ref_rejected.abs()).detach()
        if loss == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif loss == "robust":
            losses = (-F.logsigmoid(beta * delta) * (1 - eps) + F.logsigmoid(-beta * delta) * eps) / (1 - 2 * eps)
        elif loss == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif loss == "ipo":
            delta_avg = (avg_c - avg_r) - (x.ref_chosen / x.chosen_tokens - x.ref_rejected / x.rejected_tokens)
            losses = (delta_avg - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"unknown preference loss {loss!r}")
    if sft_weight:
        losses = losses + sft_weight * nll
    metrics = {"rewards/chosen": reward_c, "rewards/rejected": reward_r, "rewards/margins": reward_c - reward_r,
               "rewards/accuracies": reward_accuracy(reward_c, reward_r, scale),
               "rewards/ties": reward_ties(reward_c, reward_r, scale).float(), "logps/chosen": x.chosen.detach(),
               "logps/rejected": x.rejected.detach(), "nll/chosen": nll.detach()}
    return losses.mean(), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0 without cancellation (Mächler 2012): log(−expm1(x)) for x > −ln 2, log1p(−exp(x)) below.

    The naive log1p(−exp(x)) is −inf with a NaN gradient in float32 once exp(x) rounds to 1 (a mean log-prob above
    about −6e-8, which ORPO meets as the policy grows sure of an answer). Each branch gets an input it is finite
    on, so the branch torch.where drops carries no inf into the gradient; x is kept below −1e-12 (log(1 − exp(0)) is −inf).
    """
    x = x.clamp(max=-1e-12)
    near = x > -math.log(2)
    safe = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, safe))), torch.log1p(-torch.exp(torch.where(near, safe, x))))


TIE = 1e-6  # a reward margin within this, plus the float32 rounding of the log-probs behind it, is a tie
ROUNDING = 64 * torch.finfo(torch.float32).eps  # relative: summed log-probs of the same text in differently padded batches


def reward_accuracy(reward_c: torch.Tensor, reward_r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """1 where the chosen answer's reward is higher, 0 where lower, 0.5 for a tie.

    Before training the policy equals the reference and every reward is 0 up to float noise (the log-probs of the
    same text computed in differently padded batches differ in their last bits); counting that noise as wins or
    losses gave an untrained policy any accuracy from 0 to 1 instead of 0.5. `scale` is the size of what the margin
    was computed from (β times the summed absolute log-probs): a margin within TIE + ROUNDING·scale is a tie.
    """
    margin = reward_c - reward_r
    return torch.where(reward_ties(reward_c, reward_r, scale), torch.full_like(margin, 0.5), (margin > 0).to(margin.dtype))


def reward_ties(reward_c: torch.Tensor, reward_r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """True where the two rewards are equal up to float noise (see reward_accuracy)."""
    return (reward_c - reward_r).abs() <= TIE + ROUNDING * scale


class Reference:
    """Where reference log-probs come from: the policy with its adapter disabled, a frozen model, or nowhere.
    `weights` is the folder its weights came from (what names it in the reference log-prob cache)."""

    def __init__(self, kind: str, description: str, model=None, weights: str | None = None):
        self.kind, self.description, self.model, self.weights = kind, description, model, weights  # kind: adapter-disabled | frozen | none

    @torch.no_grad()
    def logps(self, policy, batch: dict, labelled_only: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.kind == "none":
            return None
        if self.kind == "adapter-disabled":
            with policy.disable_adapter():
                logps, _ = sequence_logps(policy, model_inputs(batch), batch["labels"], labelled_only)
        else:
            logps, _ = sequence_logps(self.model, model_inputs(batch), batch["labels"], labelled_only)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "description": self.description}


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


class PairMetricsTrainer(LabelledLoss, SeededSampling, Trainer):
    """A Trainer for losses over stacked [chosen; rejected] rows (DPO, KTO, the reward model): loss-only evaluation,
    per-example metrics kept with `store` and averaged into each log row. Length-grouped batches are seeded per
    epoch (medgpt.stages.sampling), so a resumed run sees the same pairs. Log-probs of labelled tokens take the
    labelled-positions path where it applies (medgpt.stages.token_loss)."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let the Trainer divide by gradient accumulation

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stored: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def store(self, metrics: dict, training: bool) -> None:
        split = self._stored["train" if training else "eval"]
        for key, values in metrics.items():
            split[key].extend(values.float().cpu().tolist())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stored[split].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._stored[split].clear()
        super().log(logs, start_time)


class PreferenceTrainer(PairMetricsTrainer):
    """A Trainer whose loss is a preference loss over stacked [chosen; rejected] rows; logs reward metrics."""

    def __init__(self, *args, method, reference: Reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.reference = method, reference

    def loss_inputs(self, model, batch: dict) -> LossInputs:
        logps, tokens = sequence_logps(model, model_inputs(batch), batch["labels"], self.labelled_only(model))
        half = logps.shape[0] // 2
        x = LossInputs(logps[:half], logps[half:], tokens[:half].clamp(min=1), tokens[half:].clamp(min=1))
        if "ref_chosen_logps" in batch:
            x.ref_chosen, x.ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif self.reference.kind != "none":
            x.ref_chosen, x.ref_rejected = self.reference.logps(model, batch, self.labelled_only(model))
        return x

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        m = self.method
        loss, metrics = preference_loss(self.loss_inputs(model, inputs), m.loss, m.beta, m.label_smoothing, m.sft_weight, m.simpo_gamma)
        self.store(metrics, model.training)
        return (loss, metrics) if return_outputs else loss


# --- the reference model and held-out preference metrics (medgpt.stages.methods.dpo) ---

REPORTED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/ties", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected")


def choose_reference(cfg: DictConfig, setup, policy) -> Reference:
    """The reference `method.reference` asks for (see medgpt.stages.methods.dpo); logged and recorded in summary.json."""
    reference = _reference(cfg, setup, policy)
    log.info("reference: %s", reference.description)
    return reference


def _reference(cfg: DictConfig, setup, policy) -> Reference:
    m = cfg.method
    if m.loss in REFERENCE_FREE:
        return Reference("none", f"method.loss={m.loss} is reference-free")
    start = f"run {setup.init_from}" if setup.init_from else f"the base model {setup.model_path}"
    if m.reference == "auto" or (m.reference == "base" and not setup.init_from):
        if cfg.lora.name != "none":
            return Reference("adapter-disabled", f"the starting policy ({start}): the policy with its LoRA adapter disabled",
                             weights=setup.model_path)
        return Reference("frozen", f"a frozen copy of the starting policy ({start})", frozen_copy(policy), setup.model_path)
    if m.reference == "base":
        path, what = setup.root_model_path, f"the base model {setup.root_model_path} (not the starting run {setup.init_from})"
    else:
        from medgpt.stages.merge import ensure_full_model

        run = resolve_run(m.reference, Path(cfg.paths.output_dir))
        path = str(ensure_full_model(run))
        what = f"the policy of run {run} ({path})"
    model = load_model(path, setup.placement, cfg.lora.quantization, cfg.model.trust_remote_code).eval()
    if cfg.lora.quantization:
        from medgpt.modeling.adapters import disable_4bit_cpu_packing

        disable_4bit_cpu_packing(model)  # the same 4-bit matmul path as the policy: comparable log-probs
    model.requires_grad_(False)
    return Reference("frozen", what, model, path)


@torch.no_grad()
def precompute_reference(reference: Reference, policy, dataset, collator, batch_size: int, cache: ReferenceCache | None = None):
    """Adds ref_chosen_logps / ref_rejected_logps columns, so training needs no reference forward passes.

    With a `cache`, log-probs computed once for these rows under this reference are read back instead (a sweep over
    beta or the learning rate, a re-run, the held-out split of every run of a pipeline stage)."""
    found = cache.read(reference, dataset) if cache else None
    if found is not None:
        log.info("reference log-probs for %d pairs read from %s", len(dataset), cache.path(reference, dataset))
        chosen, rejected = found
    else:
        log.info("precomputing reference log-probs for %d pairs", len(dataset))
        device = next(policy.parameters()).device
        chosen, rejected = [], []
        policy.eval()
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            c, r = reference.logps(policy, {k: v.to(device) for k, v in batch.items()})
            chosen += c.tolist()
            rejected += r.tolist()
        policy.train()
        if cache:
            cache.write(reference, dataset, chosen, rejected)
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


class ReferenceCache:
    """Reference log-probs on disk, `<cache_dir>/reference/<key>.json`, keyed by the tokenised rows (their datasets
    fingerprint: the tokenised-data cache serves the same rows with the same fingerprint) and the reference — its kind
    and description, the name, size and modification time of every weight file of the folder it came from — and the
    precision it ran in (`identity`: dtype, quantisation). Written atomically (tracking.rundir.write_json)."""

    def __init__(self, root: Path, identity: dict):
        self.root, self.identity = Path(root) / "reference", identity

    def key(self, reference: Reference, dataset) -> str | None:
        fingerprint = getattr(dataset, "_fingerprint", None)
        if not fingerprint or not reference.weights or not Path(reference.weights).is_dir():
            return None
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(reference.weights).iterdir()
                       if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
        blob = json.dumps({"rows": fingerprint, "n": len(dataset), "kind": reference.kind, "what": reference.description,
                           "files": files, **self.identity}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, reference: Reference, dataset) -> Path | None:
        key = self.key(reference, dataset)
        return self.root / f"{key}.json" if key else None

    def read(self, reference: Reference, dataset) -> tuple[list[float], list[float]] | None:
        path = self.path(reference, dataset)
        try:
            data = json.loads(path.read_text()) if path and path.exists() else None
        except (OSError, ValueError):
            return None  # unreadable: computed again and rewritten
        if not data or len(data.get("chosen", ())) != len(dataset) or len(data.get("rejected", ())) != len(dataset):
            return None
        return data["chosen"], data["rejected"]

    def write(self, reference: Reference, dataset, chosen: list[float], rejected: list[float]) -> None:
        path = self.path(reference, dataset)
        if path is None:
            return
        try:
            write_json(path, {"chosen": chosen, "rejected": rejected})
        except OSError as e:  # a cache that cannot be written costs the next run a pass, nothing more
            log.warning("reference log-probs not cached (%s)", e)


def preference_eval(trainer) -> dict:
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {k: metrics[k] for k in REPORTED if k in metrics}
