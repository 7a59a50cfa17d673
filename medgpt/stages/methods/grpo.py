"""Group-relative policy optimisation with verifiable rewards (method=grpo; TRL's GRPOTrainer).

Supports: multiple-choice questions (MedQA JSONL, MedMCQA, plain JSONL: medgpt.evaluation.mcq_data) as prompts —
the question and its lettered options plus `method.instruction`, rendered through the run's chat template; for
each prompt `method.num_generations` sampled completions (`method.temperature`, at most
`method.max_completion_length` tokens), scored by the rewards of medgpt.stages.rewards — accuracy (the stated
letter is the correct one), format (ends with "Answer: X"), and optionally a method=rm run
(`method.reward_model=<run dir>`) — weighted by `method.*_weight`; the group-relative advantage (`method.scale_rewards`),
the clipped objective (`method.epsilon`, `method.num_iterations` passes per generation, `method.loss_type`) and a
KL penalty to the starting policy (`method.beta`; with LoRA the policy with its adapter disabled, after
`model.init_from=<SFT run>` that SFT policy). Generation: the model's own batched decoding, or vLLM on GPUs when it
imports (`method.generation`: auto | transformers | vllm). `hardware.batch_size` counts prompts per device and
step: each brings num_generations completions.
Metrics per step (metrics.jsonl): reward, reward_std, rewards/accuracy|format|reward_model/mean|std, kl,
entropy, clip_ratio/*, completions/mean_length (+ min/max, clipped_ratio), rewards/skipped.
Bad rewards: a reward function that raises or returns NaN makes that step's rewards skipped (zero advantages)
and counted; `method.max_bad_reward_steps` in a row stop the run with one sentence.
Evaluation before and after: greedy answers to `method.eval_questions` held-out questions (data.eval_files),
scored with the same rewards: eval_accuracy, eval_format, eval_reward.
Refuses: dialogue, text or preference data (use method=sft, pt or dpo); a reward_model that is not a finished
method=rm run; method.generation=vllm without CUDA and vllm.
Writes: as every method, plus summary fields eval_accuracy(_before), eval_format(_before), reward_first/last
(mean training reward over the first and last quarter of the steps), rewards_skipped, reward_functions,
generation, samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from medgpt.config import MethodConfig, bounded, choice, unchecked
from medgpt.stages.protocol import Stage, TrainingParts, register_stage

INSTRUCTION = "End your reply with a line of the form 'Answer: X', where X is the letter of the correct option."


@dataclass
class GRPOMethodConfig(MethodConfig):
    num_generations: int = bounded(4, ge=2)  # completions per prompt: the group the advantage is relative to
    max_completion_length: int = bounded(64, ge=1)  # generated tokens per completion
    temperature: float = bounded(1.0, gt=0, le=2)  # sampling temperature of the completions
    beta: float = bounded(0.04, ge=0)  # KL penalty to the starting policy (0 = none, and no reference forward pass)
    epsilon: float = bounded(0.2, gt=0, lt=1)  # clip range of the probability ratio
    num_iterations: int = bounded(1, ge=1)  # optimisation passes per generated batch (> 1: the clip matters)
    scale_rewards: str = choice("group", "group", "batch", "none")  # divide (r - group mean) by the group's std, the batch's, or not
    loss_type: str = choice("dapo", "dapo", "grpo", "dr_grpo", "bnpo")  # how token losses are averaged (TRL's loss_type)
    accuracy_weight: float = bounded(1.0, ge=0)
    format_weight: float = bounded(0.5, ge=0)
    # a finished method=rm run directory (or latest) whose score is added as a reward
    reward_model: Optional[str] = unchecked(None, "a run directory or latest")
    reward_model_weight: float = bounded(1.0, ge=0)
    max_bad_reward_steps: int = bounded(3, ge=1)  # steps in a row with failing rewards before the run stops
    generation: str = choice("auto", "auto", "transformers", "vllm")  # auto: vLLM on CUDA when it imports
    instruction: str = unchecked(INSTRUCTION, "free text")  # appended to every question
    eval_questions: int = bounded(32, ge=0)  # held-out questions answered (greedily) before and after training



def build_data(ctx):
    from medgpt.stages.grpo_trainer import build_mcq_data
    from medgpt.stages.rewards import check_reward_model

    cfg = ctx.cfg
    if cfg.method.reward_model:  # refused before any model is loaded
        check_reward_model(cfg.method.reward_model, cfg.paths.output_dir)
    return build_mcq_data(cfg, ctx.setup.tokenizer, ctx.setup.template, cfg.paths.root)


def use_vllm(choice_: str) -> bool:
    """method.generation: vllm needs CUDA and an importable vllm; auto uses it exactly then."""
    import torch

    from medgpt.errors import ConfigError

    if choice_ == "transformers" or (choice_ == "auto" and not torch.cuda.is_available()):
        return False
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install counts as absent
        if choice_ == "vllm":
            raise ConfigError(f"method.generation=vllm needs vllm ({type(e).__name__}: {e}); install it (pip install "
                              "'medgpt[gpu]') or use method.generation=auto.") from None
        return False
    if not torch.cuda.is_available():
        raise ConfigError("method.generation=vllm needs CUDA GPUs; use method.generation=auto or transformers here.")
    return True


def checkpointing_field(args_cls) -> str:
    """transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns)."""
    import dataclasses

    return "activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(args_cls)} else "gradient_checkpointing"


def training_parts(ctx) -> TrainingParts:
    """The prompts, TRL's GRPOConfig with the method's knobs, and the trainer with its reward functions."""
    from trl import GRPOConfig

    from medgpt.data.templates import stop_token_ids
    from medgpt.stages.grpo_trainer import MedgptGRPOTrainer
    from medgpt.stages.rewards import RewardGuard, accuracy, answer_format, check_reward_model, reward_model

    cfg, m, hw, setup = ctx.cfg, ctx.cfg.method, ctx.cfg.hardware, ctx.setup
    guard = RewardGuard(m.max_bad_reward_steps)
    funcs, weights = [accuracy, answer_format], [m.accuracy_weight, m.format_weight]
    if m.reward_model:
        funcs.append(reward_model(check_reward_model(m.reward_model, cfg.paths.output_dir)))
        weights.append(m.reward_model_weight)
    names = [f.__name__ for f in funcs]
    stops = stop_token_ids(setup.tokenizer, setup.template)
    ctx.model.generation_config.eos_token_id = stops  # completions end at the template's end of turn
    vllm = use_vllm(m.generation)
    args = {
        "per_device_train_batch_size": hw.batch_size * m.num_generations,  # completions: whole groups on every device
        "num_generations": m.num_generations, "max_completion_length": m.max_completion_length, "temperature": m.temperature,
        "beta": m.beta, "epsilon": m.epsilon, "num_iterations": m.num_iterations, "scale_rewards": m.scale_rewards,
        "loss_type": m.loss_type, "reward_weights": weights, "shuffle_dataset": m.shuffle,
        checkpointing_field(GRPOConfig): hw.gradient_checkpointing,  # TRL's default is on; medgpt's model set-up applied it
        "disable_dropout": True,  # the same log-probs for policy, old policy and reference
        "include_num_input_tokens_seen": "no",  # GRPOTrainer counts prompt + completion tokens itself
        "use_vllm": vllm,
    }
    if vllm:
        args.update(vllm_mode="colocate", generation_kwargs={"stop_token_ids": stops})
    trainer_kwargs = {"reward_funcs": [guard.wrap(f) for f in funcs], "reward_guard": guard, "template": setup.template,
                      "eval_rows": ctx.data.eval_records, "eval_max_new_tokens": m.max_completion_length,
                      "reward_weights": dict(zip(names, weights))}
    return TrainingParts(ctx.data.train, None, None, MedgptGRPOTrainer, trainer_kwargs, args_cls=GRPOConfig, args_kwargs=args,
                         state={"reward_functions": dict(zip(names, weights)), "generation": "vllm" if vllm else "transformers",
                                "guard": guard})


def evaluate(trainer) -> dict:
    return trainer.evaluate_mcq()


def answers(ctx) -> list[str]:
    """The greedy answers of the last evaluation to the first method.sample_questions held-out questions."""
    return ctx.trainer.eval_answers[: ctx.cfg.method.sample_questions] if ctx.run.is_main else []


def reward_windows(history: list[dict], key: str = "reward") -> tuple[float | None, float | None]:
    """Mean of `key` over the first and the last quarter (at least one) of the logged training steps."""
    values = [row[key] for row in history if "loss" in row and row.get(key) is not None]
    if not values:
        return None, None
    k = max(1, len(values) // 4)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def summary(ctx) -> dict:
    first, last = reward_windows(ctx.trainer.state.log_history)
    rows = ctx.data.eval_records
    samples = [{"question": r["question"], "reference": r["answer"], "before": b, "after": a}
               for r, b, a in zip(rows, ctx.samples_before, ctx.samples_after)]
    return {"reward_functions": ctx.parts.state["reward_functions"], "reward_model": ctx.cfg.method.reward_model,
            "generation": ctx.parts.state["generation"], "beta": ctx.cfg.method.beta,
            "num_generations": ctx.cfg.method.num_generations, "reward_first": first, "reward_last": last,
            "rewards_skipped": ctx.parts.state["guard"].skipped,
            "eval_accuracy_before": ctx.before.get("eval_accuracy"), "eval_accuracy": ctx.after.get("eval_accuracy"),
            "eval_format_before": ctx.before.get("eval_format"), "eval_format": ctx.after.get("eval_format"),
            "samples": samples}


STAGE = register_stage(Stage(name="grpo", schema=GRPOMethodConfig, formats=("mcq",), build_data=build_data,
                             training_parts=training_parts, evaluate=evaluate, samples=answers, summary=summary, perplexity=False,
                             summary_fields=("reward_functions", "reward_model", "generation", "beta", "num_generations",
                                             "reward_first", "reward_last", "rewards_skipped", "eval_accuracy_before",
                                             "eval_accuracy", "eval_format_before", "eval_format", "samples"),
                             reported=("reward_first", "reward_last", "eval_accuracy_before", "eval_accuracy")))
