"""The stage protocol: a training method is a declaration (`Stage`) plus a few hooks; one lifecycle runs them all.

    medgpt/stages/methods/<name>.py   the method: its config schema, the data formats it accepts, its hooks
    conf/method/<name>.yaml           its defaults (starting from `<name>_schema`) and its default data
    tests/test_<name>.py              its test

Nothing else lists methods: the config store, validation, the data-format check, the pipeline and the
registry find them by importing every module in `medgpt.stages.methods` (`methods()`). Method modules
stay import-light (no torch at import time; hooks import what they need), so composing a config
stays fast. What every method shares — setup, model, Trainer, before/after eval, train, save, plot,
summary — is `medgpt.stages.lifecycle.run_stage`, in that order:

    prepare -> build_data -> model -> training_parts (datasets, collator, Trainer class) -> before-eval
    (+ samples) -> train -> after-eval (+ samples) -> save -> plot -> summary (common fields + the stage's own)
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

METHODS_PACKAGE = "medgpt.stages.methods"
_STAGES: dict[str, Stage] = {}


@dataclass
class TrainingParts:
    """What a stage hands the Trainer: datasets, collator, Trainer class and extra keyword arguments."""

    train: Any
    eval: Any
    collator: Any
    trainer_cls: Any = None  # None: transformers.Trainer
    trainer_kwargs: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # anything the stage's summary hook wants back (e.g. DPO's reference)
    args_cls: Any = None  # None: transformers.TrainingArguments; or a subclass the Trainer class needs (e.g. trl.GRPOConfig)
    args_kwargs: dict = field(default_factory=dict)  # the stage's own fields of args_cls (they may also replace medgpt's defaults)


@dataclass(frozen=True)
class Stage:
    """A training method's declaration. Hooks receive the lifecycle's `Context` (medgpt.stages.lifecycle)."""

    name: str
    schema: type  # the method's config dataclass; conf/method/<name>.yaml starts from `<name>_schema`
    formats: tuple[str, ...]  # data formats it trains on (medgpt.data.formats.FORMATS)
    build_data: Callable[[Any], Any]  # (ctx) -> medgpt.data.loading.StageData
    build_model: Callable[[Any], Any] | None = None  # (ctx) -> the model to train; None: the causal LM + adapter (training.build_model)
    training_parts: Callable[[Any], TrainingParts] | None = None  # (ctx) -> datasets/collator/trainer; None: LM defaults
    evaluate: Callable[[Any], dict] | None = None  # (trainer) -> held-out metrics; None: eval loss + perplexity
    samples: Callable[[Any], list] | None = None  # (ctx) -> answers to held-out prompts, taken before and after training
    summary: Callable[[Any], dict] | None = None  # (ctx) -> the stage's own summary.json fields
    summary_fields: tuple[str, ...] = ()  # the keys `summary` adds to summary.json
    reported: tuple[str, ...] = ()  # those of them worth a column in the pipeline's per-stage table and in compare
    perplexity: bool = True  # exp(eval_loss) means something (language-modelling losses only)


def register_stage(stage: Stage) -> Stage:
    if stage.name in _STAGES and _STAGES[stage.name] is not stage:
        raise ValueError(f"method '{stage.name}' declared twice")
    _STAGES[stage.name] = stage
    return stage


def methods() -> dict[str, Stage]:
    """Every declared method, by name (imports each module of medgpt.stages.methods once)."""
    package = importlib.import_module(METHODS_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")
    return dict(sorted(_STAGES.items()))


def method_for_format(fmt: str) -> str | None:
    """The first method that trains on data of format `fmt` (for 'use method=... instead' hints)."""
    from medgpt.data.formats import accepts

    return next((name for name, stage in methods().items() if accepts(stage.formats, fmt)), None)
