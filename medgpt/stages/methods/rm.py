"""Reward modelling (method=rm): a scalar reward head trained on preference pairs.

Supports: the preference data DPO reads — `conversations`/`messages` + `chosen` + `rejected`, and MedicalGPT's flat
form (`system`, `history`, `question`, `response_chosen`, `response_rejected`) — encoded as DPO encodes it (prompt
turns + response through the template; prompts longer than `method.max_prompt_length` cut from the left; pairs with
chosen == rejected dropped, counted). The model is `AutoModelForSequenceClassification` with one label (the score,
read at the last non-pad token); with LoRA (task type SEQ_CLS) the `score` head is trained fully (modules_to_save),
`lora=none` trains everything. Loss −log σ(r_c − r_r − margin) (medgpt.stages.reward): `method.margin`, or a
record's own number in its `margin` field (renamed with data.columns: {margin: <field>}), and
`method.center_rewards_coefficient` (as TRL's RewardTrainer; 0 = off).
Metrics per step: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (ties count half);
eval rows the same with eval_, before and after training.
Refuses: dialogue or plain-text data (use method=sft or method=pt).
Writes: as every method (adapter/ with the score head, or model/), plus summary fields margin,
center_rewards_coefficient, eval_accuracy_before, eval_accuracy_after, eval_margin_before, eval_margin.
Serve it: `mode=serve run=<rm run>` answers POST /v1/rewards (medgpt.serving.rewards, also `score_texts`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from medgpt.config import MethodConfig, bounded
from medgpt.stages.protocol import Stage, TrainingParts, register_stage

log = logging.getLogger(__name__)


@dataclass
class RMMethodConfig(MethodConfig):
    margin: float = bounded(0.0, ge=0)  # required reward gap: −log σ(r_c − r_r − margin); a record's `margin` field wins
    center_rewards_coefficient: float = bounded(0.0, ge=0)  # c·mean((r_c + r_r)²) keeps rewards centred (TRL suggests 0.01)
    max_prompt_length: int = bounded(256, ge=1)


def build_data(ctx):
    """DPO's pair encoding plus a `margin` column (NaN where a record has none: method.margin applies)."""
    from medgpt.data.dpo_data import encode_pairs
    from medgpt.data.loading import tokenised_splits
    from medgpt.errors import DataError

    cfg, tokenizer, template = ctx.cfg, ctx.setup.tokenizer, ctx.setup.template
    m = cfg.method

    def encode(records, split):
        dataset, stats = encode_pairs(records, template, tokenizer, m.max_length, m.max_prompt_length)
        margins = pair_margins(records)  # read with the record (medgpt.data.formats)
        stats["pairs_with_margin"] = sum(not math.isnan(v) for v in margins)
        return dataset.add_column("margin", margins), stats

    data = tokenised_splits(cfg, "rm", tokenizer, template, encode)
    train = data.stats["train"]
    if train["identical_pairs"]:
        log.warning("data: %d pairs with chosen identical to rejected were dropped", train["identical_pairs"])
    if not train["examples"]:
        raise DataError(f"{cfg.data.train_files[0]}: no usable preference pairs (all {train['identical_pairs']} had chosen == rejected).")
    log.info("data: %d train / %d eval preference pairs (%d with a margin of their own)%s", train["examples"],
             data.stats.get("eval", {}).get("examples", 0), train["pairs_with_margin"], " [tokenised-data cache hit]" if data.cache_hit else "")
    return data


def pair_margins(records) -> list[float]:
    """The margin of each pair encode_pairs keeps (chosen != rejected), NaN where the record has none."""
    return [math.nan if r.margin is None else r.margin for r in records if r.chosen.strip() != r.rejected.strip()]


def build_model(ctx):
    """The starting weights with a one-label sequence-classification head, wrapped as `lora` says (SEQ_CLS)."""
    from medgpt.modeling.adapters import apply_adapter
    from medgpt.stages.reward import load_reward_model

    cfg, setup = ctx.cfg, ctx.setup
    model = load_reward_model(setup.model_path, setup.placement, cfg.lora.quantization, cfg.model.trust_remote_code,
                              cfg.model.revision, pad_token_id=setup.tokenizer.pad_token_id)
    model.config.use_cache = False
    return apply_adapter(model, cfg.lora, cfg.model, cfg.hardware.gradient_checkpointing, task_type="SEQ_CLS")


def training_parts(ctx) -> TrainingParts:
    from medgpt.stages.reward import RewardCollator, RewardTrainer

    m = ctx.cfg.method
    collator = RewardCollator(ctx.setup.tokenizer.pad_token_id, m.margin)
    return TrainingParts(ctx.data.train, ctx.data.eval, collator, RewardTrainer,
                         {"center_rewards_coefficient": m.center_rewards_coefficient})


def evaluate(trainer) -> dict:
    from medgpt.stages.reward import reward_eval

    return reward_eval(trainer)


def summary(ctx) -> dict:
    m = ctx.cfg.method
    return {"margin": m.margin, "center_rewards_coefficient": m.center_rewards_coefficient,
            "eval_accuracy_before": ctx.before.get("eval_rewards/accuracies"),
            "eval_accuracy_after": ctx.after.get("eval_rewards/accuracies"),
            "eval_margin_before": ctx.before.get("eval_rewards/margins"),
            "eval_margin": ctx.after.get("eval_rewards/margins")}


STAGE = register_stage(Stage(name="rm", schema=RMMethodConfig, formats=("preference",), build_data=build_data,
                             build_model=build_model, training_parts=training_parts, evaluate=evaluate, summary=summary,
                             perplexity=False,
                             summary_fields=("margin", "center_rewards_coefficient", "eval_accuracy_before", "eval_accuracy_after",
                                             "eval_margin_before", "eval_margin"),
                             reported=("eval_accuracy_before", "eval_accuracy_after", "eval_margin")))
