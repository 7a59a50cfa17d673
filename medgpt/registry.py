"""The registry: training methods (declared `Stage`s, medgpt.stages.protocol) and the other modes.

`get(name)` returns a callable `(cfg, run_dir) -> summary dict`: for a method, the shared lifecycle
(medgpt.stages.lifecycle.run_stage) with the method's declaration; for a mode (merge, serve, ...,
and method=pipeline), the function filed with `@register(name)`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from medgpt.errors import ConfigError

Mode = Callable[..., dict]
MODES: dict[str, Mode] = {}
# Modules whose import files the modes; kept lazy so composing a config never imports torch.
MODE_MODULES = ("medgpt.stages.merge", "medgpt.stages.pipeline", "medgpt.serving.modes", "medgpt.tracking.compare",
                "medgpt.evaluation.modes", "medgpt.export.modes", "medgpt.stages.preview")


def available() -> list[str]:
    from medgpt.stages.protocol import methods

    for module in MODE_MODULES:
        importlib.import_module(module)
    return sorted(set(MODES) | set(methods()))


def register(name: str) -> Callable[[Mode], Mode]:
    def wrap(fn: Mode) -> Mode:
        if name in MODES and MODES[name] is not fn:
            raise ValueError(f"mode '{name}' registered twice")
        MODES[name] = fn
        return fn

    return wrap


def get(name: str, kind: str = "method") -> Mode:
    from medgpt.stages.protocol import methods

    names = available()
    stages = methods()
    if name in stages:
        from medgpt.stages.lifecycle import run_stage

        return functools.partial(run_stage, stages[name])
    if name not in MODES:
        raise ConfigError(f"{kind}={name} is not available (available: {', '.join(names)}).")
    return MODES[name]
