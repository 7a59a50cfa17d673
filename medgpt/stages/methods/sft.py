"""Supervised fine-tuning (method=sft).

Supports: ShareGPT, OpenAI-messages and Alpaca dialogues (multi-turn, system prompts, data.columns
renaming); loss on assistant turns only (method.train_on_inputs=true adds the prompts); truncation
that keeps whole turns and the final end-of-turn token; optional packing (method.packing) with
per-example position ids; LoRA / DoRA / QLoRA adapters or full fine-tuning (lora=none); DeepSpeed
ZeRO / FSDP through the Trainer; eval loss and perplexity on held-out data before and after training;
the answers of the untuned and the tuned model to held-out questions (method.sample_questions).
Refuses: plain-text or preference data (use method=pt or method=dpo).

Writes: metrics.jsonl, plots/loss.png, adapter/ or model/ (tokenizer + chat template), summary.json
(+ train_loss_mean, samples); checkpoints/ when interrupted or stopped by the loss watchdog.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.config import MethodConfig
from medgpt.stages.protocol import Stage, register_stage


@dataclass
class SFTMethodConfig(MethodConfig):
    train_on_inputs: bool = False  # true = also train on system/user tokens
    packing: bool = False  # pack several examples per row (position ids keep them apart)


def build_data(ctx):
    from medgpt.data.sft_data import build_sft_data

    return build_sft_data(ctx.cfg, ctx.setup.tokenizer, ctx.setup.template)


def questions(ctx) -> list[list[dict]]:
    return [r.messages[:-1] for r in ctx.data.eval_records[: ctx.cfg.method.sample_questions]]


def answers(ctx) -> list[str]:
    """Greedy answers of the current model to the first held-out questions (before and after training)."""
    from medgpt.data.templates import stop_token_ids
    from medgpt.modeling.generate import generate_answers

    asked, setup = questions(ctx), ctx.setup
    if not asked or not (ctx.run.is_main or ctx.trainer.is_fsdp_enabled):  # FSDP: every rank takes part in generate()
        return []
    answers = generate_answers(ctx.trainer.model, setup.tokenizer, setup.template, asked, ctx.cfg.method.sample_max_new_tokens,
                               stop_token_ids(setup.tokenizer, setup.template))
    return answers if ctx.run.is_main else []


def summary(ctx) -> dict:
    samples = [{"question": q[-1]["content"], "reference": r.messages[-1]["content"], "before": b, "after": a}
               for q, r, b, a in zip(questions(ctx), ctx.data.eval_records, ctx.samples_before, ctx.samples_after)]
    return {"samples": samples}


STAGE = register_stage(Stage(name="sft", schema=SFTMethodConfig, formats=("sharegpt", "messages", "alpaca"),
                             build_data=build_data, samples=answers, summary=summary, summary_fields=("samples",)))
