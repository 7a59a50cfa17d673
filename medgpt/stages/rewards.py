"""Rewards for method=grpo: verifiable rewards on multiple-choice questions, an optional reward model, and the guard
that skips a step whose rewards are unusable.

Reward functions follow TRL's GRPOTrainer convention: called with keyword arguments `prompts`, `completions` (the
generated texts) and every other column of the training set as a list (here `answer`, `letters`, `option_texts`),
they return one float per completion. TRL logs each one as `rewards/<name>/mean` and `rewards/<name>/std` and adds
them up with `reward_weights` before the group-relative advantage.

  accuracy      1 when the letter the completion states (`extract_letter`) is the correct one, else 0
  format        1 when the completion ends with a line "Answer: X" (X one of the question's letters); 0.5 when it
                says "Answer: X" somewhere else (mid-text, or with more text after the letter), or is one line
                giving one lettered option ("B. Radial nerve"); else 0 (rambling, several options listed)
  reward_model  a method=rm run's score of the question + answer, rendered by the reward model's own template
                (`medgpt.serving.rewards.score_texts`, imported on first use); `check_reward_model` refuses a run
                that is not a reward model

`RewardGuard` wraps each function: one that raises, returns NaN/inf, or returns the wrong number of values makes
that step's rewards unusable. The step is then skipped (its advantages are zero: no policy-gradient signal, TRL's
treatment of unscorable completions) and counted (`rewards/skipped`); `max_bad_steps` such steps in a row stop the
run with one sentence (`RewardFailed`). This module imports neither torch nor TRL.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

from medgpt.errors import ConfigError, MedgptError

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
# an explicit statement: "Answer: B", "answer - (B)", "Answer: 'B'", "Option: **C**"; anything may follow the letter but
# another letter or digit
_STATED = re.compile(r"(?i:\b(?:answer|option|choice))\s*[:=\-–]\s*[(\"'*]*\s*([A-Z])\s*[)\"'*]*(?![A-Za-z0-9])")
# "the answer is B", "correct option is (C)", "answer is: D", "the answer is option C"
_IS = re.compile(r"(?i:\b(?:answer|option|choice)\s+is)\s*:?\s*(?i:(?:option|choice|letter)\s+)?[(\"'*]*\s*([A-Z])\s*[)\"'*]*(?![A-Za-z0-9])")
_ALONE = re.compile(r"^\s*\(?\s*([A-Z])\s*\)?\s*[.:)]?\s*$")  # the whole completion is a letter: "B", "(B)", "B."
_LEADING = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):])(?:\s|$)")  # "B. Radial nerve", "(B) Radial", "B) Radial"
_FINAL = re.compile(r"^\s*Answer:\s*([A-Z])\s*\.?\s*$")  # the expected last line
_ARTICLE = re.compile(r"\s+[a-z]")  # "... is A branch of": the article A, not a letter
_ANSWER_ANYWHERE = re.compile(r"\bAnswer:\s*[(\"'*]*([A-Z])(?![A-Za-z0-9])")
_OPTION_MARK = re.compile(r"(?:^|\s)\(?[A-Z][.)](?:\s|$)")  # "B. " or "(B) " in a line: how many options it lists


class RewardFailed(MedgptError):
    """The reward functions failed at method.max_bad_reward_steps steps in a row."""


def text_of(completion) -> str:
    """A completion as text: TRL passes strings for text prompts and [{"role": "assistant", "content": ...}] for chats."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def extract_letter(text: str, letters: str = LETTERS, options: list[str] | None = None) -> str | None:
    """The answer letter a completion states, or None when it states none (or only letters outside `letters`).

    In order: the last explicit statement ("Answer: X", "the answer is X"; a capital A followed by a lower-case word
    is the article, as in "the answer is A branch of ..."), a completion that is just a letter ("B", "(B)", "B."),
    one that starts with a lettered option ("B. Radial nerve"), or one that is exactly an option's text.
    """
    found: list[tuple[int, str]] = []
    for pattern in (_STATED, _IS):
        for m in pattern.finditer(text):
            letter = m.group(1)
            if letter == "A" and _ARTICLE.match(text, m.end()):
                continue
            if letter in letters:
                found.append((m.start(), letter))
    if found:
        return max(found)[1]
    for pattern in (_ALONE, _LEADING):
        m = pattern.match(text)
        if m:
            letter = next(g for g in m.groups() if g)
            return letter if letter in letters else None
    if options:
        said = _normal(text)
        for letter, option in zip(letters, options):
            if said and said == _normal(option):
                return letter
    return None


def format_score(text: str, letters: str = LETTERS) -> float:
    """1.0: the last non-empty line is "Answer: X" with X among `letters`; 0.5: "Answer: X" appears elsewhere, or the
    whole reply is one line giving one lettered option ("B", "(B)", "B. Radial nerve"); else 0 (no letter, several
    options listed, or an answer in another form)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        m = _FINAL.match(lines[-1])
        if m and m.group(1) in letters:
            return 1.0
    if any(m.group(1) in letters for m in _ANSWER_ANYWHERE.finditer(text)):
        return 0.5
    if len(lines) == 1:
        m = _ALONE.match(lines[0]) or _LEADING.match(lines[0])
        if m and next(g for g in m.groups() if g) in letters and len(_OPTION_MARK.findall(lines[0])) <= 1:
            return 0.5
    return 0.0


def accuracy(completions, answer, letters=None, option_texts=None, **_) -> list[float]:
    """1.0 when the stated letter is the correct one."""
    letters = letters or [LETTERS] * len(completions)
    options = option_texts or [None] * len(completions)
    return [float(extract_letter(text_of(c), ls, opts) == a) for c, a, ls, opts in zip(completions, answer, letters, options)]


def answer_format(completions, letters=None, **_) -> list[float]:
    """format_score of each completion."""
    letters = letters or [LETTERS] * len(completions)
    return [format_score(text_of(c), ls) for c, ls in zip(completions, letters)]


answer_format.__name__ = "format"  # logged as rewards/format/mean


def check_reward_model(run_dir: str, output_dir: str | Path) -> str:
    """The run directory of `method.reward_model`, refused in one sentence unless it is a finished method=rm run."""
    from medgpt.tracking.rundir import read_summary, resolve_run, trained_run

    try:
        path = trained_run(resolve_run(run_dir, Path(output_dir)))  # run=latest works; a pipeline root: its last stage
    except ConfigError as e:
        raise ConfigError(f"method.reward_model: {e}") from None
    summary = read_summary(path)
    stage, status = summary.get("stage"), summary.get("status")
    if stage != "rm" or status != "completed":
        what = f"a {stage} run" if stage else "not a finished run"
        raise ConfigError(f"method.reward_model={run_dir} is {what}{f' ({status})' if stage and status != 'completed' else ''}, "
                          "not a finished reward model: point it at the directory of a completed method=rm run, or leave it unset.")
    return str(path)


def reward_model(run_dir: str, score_texts: Callable[[str, list], list[float]] | None = None) -> Callable:
    """A reward function scoring each answer with the method=rm run in `run_dir`.

    With the training set's `messages` column (the question as a conversation) the reward model gets the
    conversation plus the answer as an assistant turn and renders it through its own chat template; without it, the
    rendered prompt + completion text. `score_texts(run_dir, texts_or_conversations) -> list[float]` defaults to
    medgpt.serving.rewards.score_texts, imported when first called (it loads the reward model once and keeps it).
    """

    def score(prompts, completions, messages=None, **_) -> list[float]:
        scorer = score_texts
        if scorer is None:
            try:
                from medgpt.serving.rewards import score_texts as scorer
            except ImportError as e:
                raise ConfigError("method.reward_model needs medgpt.serving.rewards.score_texts, which this installation "
                                  f"lacks ({e}); leave method.reward_model unset.") from None
        if messages is not None:
            items = [[*m, {"role": "assistant", "content": text_of(c)}] for m, c in zip(messages, completions)]
        else:
            items = [text_of(p) + text_of(c) for p, c in zip(prompts, completions)]
        return [float(v) for v in scorer(run_dir, items)]

    score.__name__ = "reward_model"
    return score


class RewardGuard:
    """Makes a failing reward function a skipped step instead of a crash, and stops after too many in a row.

    `wrap(func)` catches what `func` raises (and checks what it returns) per call; `end_step(bad)` is called once per
    generation step with whether any reward of the step, gathered from every process, is unusable. Every process
    sees the same gathered rewards, so all of them skip, count and stop at the same step.
    """

    def __init__(self, max_bad_steps: int = 3):
        self.max_bad_steps = max(1, int(max_bad_steps))
        self.in_a_row = 0
        self.skipped = 0
        self.problems: dict[str, str] = {}  # this step's: reward name -> what went wrong (this process only)

    def wrap(self, func: Callable, name: str | None = None) -> Callable:
        name = name or func.__name__

        @functools.wraps(func)
        def guarded(*args, **kwargs) -> list[float]:
            n = len(kwargs.get("completions", args[1] if len(args) > 1 else []))
            try:
                values = list(func(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - any failure of a reward function is a skipped step
                self.problems.setdefault(name, f"raised {type(e).__name__}: {e}")
                return [math.nan] * n
            if len(values) != n:
                self.problems.setdefault(name, f"returned {len(values)} values for {n} completions")
                return [math.nan] * n
            out = [math.nan if v is None else float(v) for v in values]
            if not all(math.isfinite(v) for v in out):
                self.problems.setdefault(name, "returned NaN or inf")
            return out

        guarded.__name__ = name
        return guarded

    def end_step(self, bad: bool, step: int | None = None) -> bool:
        """Record one step; True when its rewards are to be skipped. Raises RewardFailed at max_bad_steps in a row."""
        problems, self.problems = self.problems, {}
        if not bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        what = "; ".join(f"{name} {problem}" for name, problem in problems.items()) or "a reward function failed on another process"
        log.warning("step %s: rewards skipped (%s); %d bad step(s) in a row, %d in all", step, what, self.in_a_row, self.skipped)
        if self.in_a_row >= self.max_bad_steps:
            raise RewardFailed(f"the rewards were unusable at {self.in_a_row} steps in a row (last: {what}); fix the reward "
                               f"function or method.reward_model, or raise method.max_bad_reward_steps (now {self.max_bad_steps}).")
        return True
