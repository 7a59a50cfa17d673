"""Kahneman-Tversky optimisation (method=kto) on unpaired answers marked desirable or not (Ethayarajh et al. 2024).

Supports: unpaired data — `conversations`/`messages` prompt turns + `completion` (or the answer as the final
assistant turn) + `label` true|false — and preference pairs, each split into a desirable (chosen) and an
undesirable (rejected) example (`data=dpo_demo` works); multi-turn prompts through the template; loss on the
final answer only; prompts longer than `method.max_prompt_length` cut from the left (counted).
Loss (`method.loss`, TRL 1.16's formulas, medgpt.stages.kto_loss): `kto` — w_d·(1 − σ(β(r − z₀))) for desirable,
w_u·(1 − σ(β(z₀ − r))) for undesirable answers, r the policy/reference log-ratio, z₀ the KL reference point
estimated from the batch's mismatched pairs (row i's prompt with row i−1's answer), detached and clamped at 0;
`apo_zero_unpaired` — no KL term. `method.beta`, `method.desirable_weight`, `method.undesirable_weight` (a warning
when they do not balance the label counts, Eq. 8 of the paper).
Reference (`method.reference`): as method=dpo — auto (with LoRA the adapter-disabled starting policy, after
`model.init_from=<SFT run>` the SFT policy; with full fine-tuning a frozen copy), base, <run dir>.
Metrics per step: loss, kl, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected.
Refuses: loss=kto with hardware.batch_size or eval_batch_size 1 (the KL estimate needs other rows in the batch);
dialogue or plain-text data (use method=sft or method=pt); unpaired records without `label` (file:line).
Writes: as every method, plus summary fields loss, beta, desirable_weight, undesirable_weight, reference,
eval_kl, eval_reward_chosen, eval_reward_rejected, eval_reward_margin(_before).
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.config import MethodConfig, bounded, choice, unchecked
from medgpt.errors import ConfigError
from medgpt.stages.protocol import Stage, TrainingParts, register_stage


@dataclass
class KTOMethodConfig(MethodConfig):
    loss: str = choice("kto", "kto", "apo_zero_unpaired")
    beta: float = bounded(0.1, gt=0)
    desirable_weight: float = bounded(1.0, gt=0)
    undesirable_weight: float = bounded(1.0, gt=0)
    reference: str = unchecked("auto", "auto | base | a run directory")  # the reference policy (see the docstring)
    max_prompt_length: int = bounded(256, ge=1)


def check_batch_size(cfg) -> None:
    """loss=kto estimates its KL reference point from the other rows of each batch: a batch of one has none."""
    hw = cfg.hardware
    for key in ("batch_size", "eval_batch_size"):
        if cfg.method.loss == "kto" and hw[key] < 2:
            raise ConfigError(f"method=kto estimates its KL reference point from the other examples of each batch, so it needs "
                              f"hardware.{key} >= 2 per device (got {hw[key]}): raise it (lower hardware.grad_accum to keep the "
                              "effective batch), or use method.loss=apo_zero_unpaired, which has no KL term.")


def build_data(ctx):
    from medgpt.data.kto_data import build_kto_data

    check_batch_size(ctx.cfg)  # before the data and the model are loaded
    return build_kto_data(ctx.cfg, ctx.setup.tokenizer, ctx.setup.template)


def training_parts(ctx) -> TrainingParts:
    """Unpaired rows (+ their mismatched KL rows), the KTO trainer, and the reference."""
    from medgpt.data.kto_data import UnpairedCollator
    from medgpt.stages.kto_loss import KTOTrainer, needs_kl
    from medgpt.stages.preference import choose_reference

    m, setup = ctx.cfg.method, ctx.setup
    check_batch_size(ctx.cfg)
    reference = choose_reference(ctx.cfg, setup, ctx.model)
    collator = UnpairedCollator(setup.tokenizer.pad_token_id, m.max_length, kl=needs_kl(m.loss))
    return TrainingParts(ctx.data.train, ctx.data.eval, collator, KTOTrainer, {"method": m, "reference": reference},
                         state={"reference": reference.as_dict()})


def evaluate(trainer) -> dict:
    from medgpt.stages.kto_loss import kto_eval

    return kto_eval(trainer)


def summary(ctx) -> dict:
    m = ctx.cfg.method
    return {"loss": m.loss, "beta": m.beta, "desirable_weight": m.desirable_weight, "undesirable_weight": m.undesirable_weight,
            "reference": ctx.parts.state["reference"], "eval_kl": ctx.after.get("eval_kl"),
            "eval_reward_chosen": ctx.after.get("eval_rewards/chosen"), "eval_reward_rejected": ctx.after.get("eval_rewards/rejected"),
            "eval_reward_margin_before": ctx.before.get("eval_rewards/margins"),
            "eval_reward_margin": ctx.after.get("eval_rewards/margins")}


STAGE = register_stage(Stage(name="kto", schema=KTOMethodConfig, formats=("unpaired", "preference"), build_data=build_data,
                             training_parts=training_parts, evaluate=evaluate, summary=summary, perplexity=False,
                             summary_fields=("loss", "beta", "desirable_weight", "undesirable_weight", "reference", "eval_kl",
                                             "eval_reward_chosen", "eval_reward_rejected", "eval_reward_margin_before",
                                             "eval_reward_margin"),
                             reported=("eval_reward_margin_before", "eval_reward_margin", "reference")))
