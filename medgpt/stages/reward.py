"""Reward models (the machinery behind medgpt.stages.methods.rm): the model, the pairwise loss, batches and the trainer.

A reward model is the causal LM's body with a sequence-classification head (`AutoModelForSequenceClassification`,
num_labels=1): one scalar per text, read at the last token that is not the pad token (transformers' rule; the
config's pad_token_id is set from the tokenizer). A pair's chosen and rejected texts (prompt + response through the
template, as DPO encodes them) run in one forward as the stacked rows [chosen; rejected].

Loss (Ouyang et al. 2022; TRL's RewardTrainer), with r_c, r_r the rewards of a pair:
    −log σ(r_c − r_r − m)  +  c · mean((r_c + r_r)²)
m = the pair's own margin (a record's `margin` field) or `method.margin`; c = `method.center_rewards_coefficient`
(Eisenstein et al. 2023: keeps rewards centred on 0). Metrics: rewards/chosen, rewards/rejected, rewards/margins
(r_c − r_r) and rewards/accuracies (1 when r_c > r_r, 0 when lower, 0.5 for a tie).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from medgpt.data.collate import PreferenceCollator
from medgpt.errors import ModelError
from medgpt.stages.preference import PairMetricsTrainer

log = logging.getLogger(__name__)

TIE = 1e-6  # relative: |r_c − r_r| within TIE·(1 + |r_c| + |r_r|) is a tie (float noise of differently padded batches)
REPORTED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected")


def load_reward_model(path: str, placement, quantization: str | None = None, trust_remote_code: bool = False,
                      revision: str | None = None, pad_token_id: int | None = None):
    """`path` (a causal LM, or a saved reward model) as AutoModelForSequenceClassification with one label.

    A causal LM's weights load into the body and the `score` head starts random; a saved reward model (model/ of
    a full fine-tune) brings its own head. The pad token id goes into the config: the score is read at the last
    token that is not the pad token.
    """
    from transformers import AutoModelForSequenceClassification

    from medgpt.modeling.loader import quantization_config

    kwargs = dict(num_labels=1, dtype=placement.dtype, attn_implementation=placement.attn_implementation,
                  trust_remote_code=trust_remote_code)
    if quantization:
        kwargs["quantization_config"] = quantization_config(quantization, placement.dtype)
        kwargs["device_map"] = {"": 0} if placement.device == "cuda" else {"": placement.device}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {path} as a reward model (sequence classification, one label): {e}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise ModelError(f"{path}: no pad token id, so the reward model cannot tell where a padded text ends; "
                         "give the tokenizer a pad token.")
    if not quantization:
        model.to(placement.device)
    log.info("reward model: %s (%.1fM parameters, %s, %s; score head: one label, read at the last non-pad token)", path,
             model.num_parameters() / 1e6, placement.device, str(placement.dtype).removeprefix("torch."))
    return model


def rewards_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One float32 reward per row."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen text scores higher, 0 where lower, 0.5 for a tie."""
    diff = chosen - rejected
    tie = diff.abs() <= TIE * (1 + chosen.abs() + rejected.abs())
    return torch.where(tie, torch.full_like(diff, 0.5), (diff > 0).to(diff.dtype))


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                center_rewards_coefficient: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, per-pair metrics): −log σ(r_c − r_r − margin), plus c·mean((r_c + r_r)²) when c > 0."""
    diff = chosen - rejected
    loss = -F.logsigmoid(diff - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    metrics = {"rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach(), "rewards/margins": diff.detach(),
               "rewards/accuracies": pair_accuracy(chosen.detach(), rejected.detach())}
    return loss, metrics


class RewardCollator:
    """Pairs as stacked [chosen; rejected] rows (input_ids, attention_mask) and each pair's margin.

    A pair without a margin of its own (NaN in the `margin` column) gets `default_margin` (method.margin)."""

    def __init__(self, pad_token_id: int, default_margin: float = 0.0):
        self.pairs = PreferenceCollator(pad_token_id)
        self.default_margin = float(default_margin)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pairs(rows)
        margins = [r.get("margin") for r in rows]
        margin = [self.default_margin if m is None or math.isnan(m) else float(m) for m in margins]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "margin": torch.tensor(margin, dtype=torch.float32)}


class RewardTrainer(PairMetricsTrainer):
    """A Trainer whose loss is the pairwise reward loss over [chosen; rejected] rows in one forward; logs reward metrics."""

    def __init__(self, *args, center_rewards_coefficient: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = rewards_of(model, inputs["input_ids"], inputs["attention_mask"])
        half = rewards.shape[0] // 2
        loss, metrics = reward_loss(rewards[:half], rewards[half:], inputs["margin"].to(rewards.device), self.center_rewards_coefficient)
        self.store(metrics, model.training)
        return (loss, metrics) if return_outputs else loss


def reward_eval(trainer) -> dict:
    """Held-out loss, accuracy (ties count half), mean margin and mean rewards; {} without an eval split."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {k: metrics[k] for k in REPORTED if k in metrics}
