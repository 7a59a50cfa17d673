"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): the loss, its KL
reference point and the trainer behind medgpt.stages.methods.kto. The formulas are TRL 1.16's (KTOTrainer._compute_loss;
tests/test_kto.py checks parity with it to 1e-6):

  r(x, y) = log π(y|x) − log π_ref(y|x)                           (summed over the completion's tokens)
  z₀      = max(0, mean_i[log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)])   KL reference point from the batch's
            mismatched pairs (row i's prompt, row i−1's completion), detached, averaged over ranks, clamped at 0
  kto                 desirable: w_d·(1 − σ(β(r − z₀)))     undesirable: w_u·(1 − σ(β(z₀ − r)))
  apo_zero_unpaired   desirable: w_d·(1 − σ(βr))            undesirable: w_u·σ(βr)          (no KL term)
  loss    = mean over the batch's examples; rewards β·r, logged per label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medgpt.modeling.token_logps import sequence_logps
from medgpt.stages.preference import PreferenceTrainer, Reference, model_inputs

LOSSES = ("kto", "apo_zero_unpaired")
REPORTED = ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_logps/chosen",
            "eval_logps/rejected")


def needs_kl(loss: str) -> bool:
    return loss == "kto"


def kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, gather=None) -> torch.Tensor:
    """z₀: the mean log-ratio of the mismatched rows, detached, averaged over ranks (`gather`), clamped at 0."""
    kl = (kl_logps - ref_kl_logps).mean().detach()
    if gather is not None:
        kl = gather(kl)
    return kl.mean().clamp(min=0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | None, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss: str = "kto"):
    """(mean loss, per-example metrics) for one batch of unpaired examples; `desirable` is a bool per row."""
    desirable = desirable.to(device=logps.device, dtype=torch.bool)
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    if loss == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected))
    elif loss == "apo_zero_unpaired":
        chosen_losses = 1 - F.sigmoid(beta * chosen)
        rejected_losses = F.sigmoid(beta * rejected)
    else:
        raise ValueError(f"unknown unpaired loss {loss!r}")
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    metrics = {"rewards/chosen": beta * chosen.detach(), "rewards/rejected": beta * rejected.detach(),
               "logps/chosen": logps[desirable].detach(), "logps/rejected": logps[~desirable].detach()}
    return losses.nanmean(), metrics


def forward_logps(model, batch: dict, prefix: str = "", labelled_only: bool = True) -> torch.Tensor:
    """Summed completion log-probs of the rows `<prefix>input_ids` (labels `<prefix>labels`) under `model`."""
    rows = {k: batch[prefix + k] for k in ("input_ids", "attention_mask") if prefix + k in batch}
    return sequence_logps(model, model_inputs(rows), batch[prefix + "labels"], labelled_only)[0]


@torch.no_grad()
def reference_logps(reference: Reference, policy, batch: dict, prefix: str = "", labelled_only: bool = True) -> torch.Tensor:
    if reference.kind == "adapter-disabled":
        with policy.disable_adapter():
            return forward_logps(policy, batch, prefix, labelled_only)
    return forward_logps(reference.model, batch, prefix, labelled_only)


class KTOTrainer(PreferenceTrainer):
    """PreferenceTrainer with the KTO loss over unpaired rows (medgpt.data.kto_data.UnpairedCollator's batches).

    Per step: the policy on the mismatched rows (no gradient, as in TRL), the reference on both, the policy on the
    examples. Logs loss, kl, rewards/chosen, rewards/rejected, rewards/margins (difference of the means), logps/*."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        m, fused = self.method, self.labelled_only(model)
        kl = None
        if needs_kl(m.loss):
            with torch.no_grad():
                kl_logps = forward_logps(model, inputs, "kl_", fused)
            ref_kl_logps = reference_logps(self.reference, model, inputs, "kl_", fused)
            kl = kl_estimate(kl_logps, ref_kl_logps, self.accelerator.gather if self.accelerator.num_processes > 1 else None)
        ref = reference_logps(self.reference, model, inputs, labelled_only=fused)
        logps = forward_logps(model, inputs, labelled_only=fused)
        loss, metrics = kto_loss(logps, ref, inputs["desirable"], kl, m.beta, m.desirable_weight, m.undesirable_weight, m.loss)
        self.store({**metrics, **({"kl": kl.reshape(1)} if kl is not None else {})}, model.training)
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        chosen, rejected = self._stored[split].get("rewards/chosen"), self._stored[split].get("rewards/rejected")
        if chosen and rejected:
            logs[("eval_" if split == "eval" else "") + "rewards/margins"] = sum(chosen) / len(chosen) - sum(rejected) / len(rejected)
        super().log(logs, start_time)


def kto_eval(trainer) -> dict:
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {k: metrics[k] for k in REPORTED if k in metrics}
