"""The machinery behind method=grpo (medgpt.stages.methods.grpo): TRL's GRPOTrainer with medgpt's data, template,
run directory and reward guard.

What TRL (1.16) does — `trl.GRPOTrainer`, a transformers.Trainer subclass, so medgpt's callbacks (metrics.jsonl,
interrupt guard, loss watchdog), checkpoints and `resume=true` work as for every method:
  sampling `num_generations` completions per prompt (the model's own batched `generate`, or vLLM with use_vllm),
  calling the reward functions, the group-relative advantage (r - mean of the prompt's group) / (std of the group
  + 1e-4) (`scale_rewards`: group | batch | none), the clipped policy-gradient loss (`epsilon`, `loss_type`), the KL
  term to the reference (`beta`; with LoRA the reference is the policy with its adapter disabled), the repeat
  sampler that keeps each prompt's group together across processes, and the per-step metrics: reward, reward_std,
  rewards/<function>/mean|std, frac_reward_zero_std, kl, entropy, clip_ratio/*, completions/mean_length (and
  min/max, clipped_ratio: completions cut at max_completion_length), num_tokens.
What is ours, and why:
  - `GRPOTrainer.__init__` takes no `data_collator` (medgpt's make_trainer passes one for every method): dropped.
  - prompts are rendered by medgpt's template (the one saved with the run and used when serving), not by the
    tokenizer's chat template, so they are tokenised as text with add_special_tokens=False: the template writes
    its own special tokens (TRL's default would add a second BOS with tokenizers that add one).
  - the completions stop at the template's end-of-turn tokens (`stop_token_ids`), set on the model's generation config.
  - TRL copies a PEFT model's adapter into a frozen "ref" adapter as the reference. medgpt's adapter is new at the
    start of every stage (`model.init_from` merges the previous run first), so the policy with its adapter disabled
    is the starting policy exactly: the copy is dropped (less memory, and adapter/ holds the trained adapter only).
  - a reward step that cannot be used (a function raised, returned NaN/inf or the wrong count) is skipped and
    counted, and too many in a row stop the run (medgpt.stages.rewards.RewardGuard): TRL would crash on the
    exception, and would treat NaN as "not applicable" and carry on indefinitely.
  - held-out evaluation is greedy answers to held-out questions (medgpt.modeling.generate) scored with the same
    reward functions (eval_accuracy, eval_format), not TRL's sampled eval loop.
"""

from __future__ import annotations

import logging
import random

import torch
from datasets import Dataset
from trl import GRPOTrainer

from medgpt.data.loading import StageData, eval_limit
from medgpt.data.templates import Template, stop_token_ids
from medgpt.errors import DataError
from medgpt.evaluation.mcq_data import MCQItem, load_mcq
from medgpt.stages.rewards import RewardGuard, accuracy, format_score, text_of

log = logging.getLogger(__name__)


# --- data: multiple-choice questions -> rendered prompts + what the rewards need ---


def question_messages(item: MCQItem, instruction: str, system_prompt: str | None = None) -> list[dict]:
    """The conversation asking `item`: the question, its lettered options, then the answer instruction."""
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    content = f"{item.question}\n\n{options}" + (f"\n\n{instruction}" if instruction else "")
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]


def mcq_rows(items: list[MCQItem], tokenizer, template: Template, instruction: str, system_prompt: str | None,
             max_prompt_tokens: int) -> tuple[list[dict], dict]:
    """One row per question: {prompt (rendered text), messages, answer, letters, option_texts, id}; prompts longer
    than `max_prompt_tokens` are dropped and counted."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    rows, lengths, too_long = [], [], 0
    for item in items:
        messages = question_messages(item, instruction, system_prompt)
        prompt = template.render(messages, bos, eos, add_generation_prompt=True)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > max_prompt_tokens:
            too_long += 1
            continue
        lengths.append(n)
        rows.append({"prompt": prompt, "messages": messages, "answer": item.answer, "letters": "".join(item.options),
                     "option_texts": list(item.options.values()), "id": item.id, "question": item.question})
    stats = {"examples": len(rows), "tokens": sum(lengths), "prompt_tokens_max": max(lengths, default=0), "too_long": too_long}
    return rows, stats


def build_mcq_data(cfg, tokenizer, template: Template, root) -> StageData:
    """Training prompts from data.train_files, held-out questions from data.eval_files (or data.eval_split of train)."""
    from pathlib import Path

    from medgpt.data.formats import expand_files

    data, m = cfg.data, cfg.method
    if data.columns:
        raise DataError(f"data.columns={dict(data.columns)}: multiple-choice files are read in their published layouts "
                        "(MedQA, MedMCQA, plain JSONL; medgpt.evaluation.mcq_data); leave data.columns empty.")
    root = Path(root)
    train, report = load_mcq(expand_files(list(data.train_files), root), on_error=data.on_error, limit=data.max_samples)
    skipped = report["skipped"]
    if data.eval_files:
        held, eval_report = load_mcq(expand_files(list(data.eval_files), root), on_error=data.on_error,
                                     limit=eval_limit(data.max_samples))
        skipped += eval_report["skipped"]
    elif data.eval_split > 0:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_held = min(len(train) - 1, max(1, round(len(train) * data.eval_split)))
        held_ids = set(order[:n_held])
        held, train = [t for i, t in enumerate(train) if i in held_ids], [t for i, t in enumerate(train) if i not in held_ids]
    else:
        held = []
    overlap = {i.question for i in train} & {i.question for i in held}
    if overlap:
        raise DataError(f"{len(overlap)} held-out question(s) are also in data.train_files (e.g. {sorted(overlap)[0][:80]!r}); "
                        "keep evaluation questions out of training.")
    held = held[: m.eval_questions]
    max_prompt = max(1, m.max_length - m.max_completion_length)
    train_rows, train_stats = mcq_rows(train, tokenizer, template, m.instruction, data.system_prompt, max_prompt)
    eval_rows, eval_stats = mcq_rows(held, tokenizer, template, m.instruction, data.system_prompt, max_prompt)
    if not train_rows:
        raise DataError(f"no training question fits method.max_length={m.max_length} with method.max_completion_length="
                        f"{m.max_completion_length}; raise method.max_length.")
    if train_stats["too_long"] or eval_stats["too_long"]:
        log.warning("dropped %d prompts longer than %d tokens (method.max_length - method.max_completion_length)",
                    train_stats["too_long"] + eval_stats["too_long"], max_prompt)
    columns = ("prompt", "messages", "answer", "letters", "option_texts", "id")  # all but prompt reach the reward functions
    train_ds = Dataset.from_list([{k: r[k] for k in columns} for r in train_rows])
    stats = {"format": "mcq", "skipped": skipped, "train": train_stats, "eval": eval_stats}
    return StageData(train_ds, None, eval_rows, stats, cache_hit=False)


# --- the trainer ---


class MedgptGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer plus medgpt's glue (the module docstring lists what and why)."""

    def __init__(self, *args, data_collator=None, reward_guard: RewardGuard | None = None, template: Template | None = None,
                 eval_rows: list[dict] | None = None, eval_max_new_tokens: int = 64, reward_weights: dict | None = None, **kwargs):
        del data_collator  # GRPO builds its batches itself (prompts in, completions generated)
        self.reward_guard = reward_guard or RewardGuard()
        self.template, self.eval_rows, self.eval_max_new_tokens = template, eval_rows or [], eval_max_new_tokens
        self.weights = reward_weights or {}
        self.eval_answers: list[str] = []
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "peft_config", None) and "ref" in model.peft_config:
            model.delete_adapter("ref")  # the reference is the policy with its adapter disabled (see the module docstring)

    def _tokenize_prompts(self, prompts: list):
        if prompts and isinstance(prompts[0], str):  # rendered by medgpt's template, special tokens included
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}
        return super()._tokenize_prompts(prompts)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered: every process agrees
        bad = not bool(torch.isfinite(rewards).all())
        if self.model.training and self.reward_guard.end_step(bad, self.state.global_step + 1):
            return torch.full_like(rewards, float("nan"))  # unscorable: TRL zeroes the advantages and leaves the stats out
        return rewards

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["rewards/skipped"] = self.reward_guard.skipped  # skipped reward steps so far in this run
        super().log(logs, start_time)

    # --- held-out evaluation: greedy answers scored with the training rewards ---

    def evaluate_mcq(self) -> dict:
        if not self.eval_rows:
            return {}
        from medgpt.modeling.generate import generate_answers

        tokenizer = self.processing_class
        stops = stop_token_ids(tokenizer, self.template)
        answers = generate_answers(self.accelerator.unwrap_model(self.model), tokenizer, self.template,
                                   [r["messages"] for r in self.eval_rows], self.eval_max_new_tokens, stops,
                                   batch_size=self.args.per_device_eval_batch_size)
        self.eval_answers = answers
        acc = accuracy(answers, [r["answer"] for r in self.eval_rows], [r["letters"] for r in self.eval_rows],
                       [r["option_texts"] for r in self.eval_rows])
        fmt = [format_score(text_of(a), r["letters"]) for a, r in zip(answers, self.eval_rows)]
        n = len(answers)
        metrics = {"eval_accuracy": sum(acc) / n, "eval_format": sum(fmt) / n,
                   "eval_reward": sum(self.weights.get("accuracy", 1.0) * a + self.weights.get("format", 0.0) * f
                                      for a, f in zip(acc, fmt)) / n}
        self.log(dict(metrics))
        return metrics
