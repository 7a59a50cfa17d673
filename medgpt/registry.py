"""The stage registry: `@register("sft")` files a function under a name; run.py looks it up.

A stage is called as `stage(cfg, run_dir) -> summary dict`. Training stages are found by
`method.name`, the other modes (merge, serve, ...) by `mode`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from medgpt.errors import ConfigError

Stage = Callable[..., dict]
STAGES: dict[str, Stage] = {}
# Modules whose import fills the registry; kept lazy so composing a config never imports torch.
STAGE_MODULES = ("medgpt.stages.sft", "medgpt.stages.pt", "medgpt.stages.dpo", "medgpt.stages.merge", "medgpt.stages.pipeline",
                 "medgpt.serving.modes", "medgpt.tracking.compare")


def available() -> list[str]:
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return sorted(STAGES)


def register(name: str) -> Callable[[Stage], Stage]:
    def wrap(fn: Stage) -> Stage:
        if name in STAGES and STAGES[name] is not fn:
            raise ValueError(f"stage '{name}' registered twice")
        STAGES[name] = fn
        return fn

    return wrap


def get(name: str, kind: str = "method") -> Stage:
    names = available()
    if name not in STAGES:
        raise ConfigError(f"{kind}={name} is not available (available: {', '.join(names)}).")
    return STAGES[name]
