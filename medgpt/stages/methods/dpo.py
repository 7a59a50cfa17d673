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
reference log-probs once before training (also what to use with ZeRO-3 / FSDP and full fine-tuning:
the reference is then never sharded) and caches them beside the tokenised data (`<cache_dir>/reference/`), so
a sweep or a re-run over the same pairs and reference reads them back (medgpt.stages.preference.ReferenceCache).
The choice is recorded in summary.json.
Metrics per step: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/*.
Refuses: dialogue or plain-text data (use method=sft or method=pt).
Writes: as every method, plus summary fields loss, beta, reference, eval_reward_accuracy(_before), eval_reward_margin.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.config import MethodConfig, bounded, choice, unchecked
from medgpt.stages.protocol import Stage, TrainingParts, register_stage


@dataclass
class DPOMethodConfig(MethodConfig):
    beta: float = bounded(0.1, gt=0)
    loss: str = choice("sigmoid", "sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    reference: str = unchecked("auto", "auto | base | a run directory")  # the reference policy (see the docstring)
    sft_weight: float = bounded(0.0, ge=0)
    precompute_reference: bool = False  # reference log-probs computed once before training (no reference forward per step)
    max_prompt_length: int = bounded(256, ge=1)
    simpo_gamma: float = bounded(0.5, ge=0)  # SimPO's target reward margin


def build_data(ctx):
    from medgpt.data.dpo_data import build_dpo_data

    return build_dpo_data(ctx.cfg, ctx.setup.tokenizer, ctx.setup.template)


def training_parts(ctx) -> TrainingParts:
    """Pairs, the preference collator, and the reference (chosen, and its log-probs precomputed when asked)."""
    from pathlib import Path

    from medgpt.data.collate import PreferenceCollator
    from medgpt.stages.preference import PreferenceTrainer, ReferenceCache, choose_reference, precompute_reference

    m, setup = ctx.cfg.method, ctx.setup
    reference = choose_reference(ctx.cfg, setup, ctx.model)
    collator = PreferenceCollator(setup.tokenizer.pad_token_id)
    train, held = ctx.data.train, ctx.data.eval
    precomputed = bool(m.precompute_reference and reference.kind != "none")
    if precomputed:
        batch = ctx.cfg.hardware.eval_batch_size
        precision = {"device": setup.placement.device, "dtype": str(setup.placement.dtype), "autocast": setup.placement.mixed_precision,
                     "quantization": ctx.cfg.lora.quantization}
        cache = ReferenceCache(Path(ctx.cfg.paths.cache_dir), precision)
        train = precompute_reference(reference, ctx.model, train, collator, batch, cache)
        held = precompute_reference(reference, ctx.model, held, collator, batch, cache) if held else None
        reference.model = None  # no longer needed: free its memory
    return TrainingParts(train, held, collator, PreferenceTrainer, {"method": m, "reference": reference},
                         state={"reference": {**reference.as_dict(), "precomputed": precomputed}})


def evaluate(trainer) -> dict:
    from medgpt.stages.preference import preference_eval

    return preference_eval(trainer)


def summary(ctx) -> dict:
    m = ctx.cfg.method
    return {"loss": m.loss, "beta": m.beta, "reference": ctx.parts.state["reference"],
            "eval_reward_accuracy_before": ctx.before.get("eval_rewards/accuracies"),
            "eval_reward_accuracy": ctx.after.get("eval_rewards/accuracies"),
            "eval_reward_margin": ctx.after.get("eval_rewards/margins")}


STAGE = register_stage(Stage(name="dpo", schema=DPOMethodConfig, formats=("preference",), build_data=build_data,
                             training_parts=training_parts, evaluate=evaluate, summary=summary, perplexity=False,
                             summary_fields=("loss", "beta", "reference", "eval_reward_accuracy_before", "eval_reward_accuracy",
                                             "eval_reward_margin"),
                             reported=("eval_reward_accuracy_before", "eval_reward_accuracy", "reference")))
