"""One run: validate the composed config, create the run directory once, dispatch to a stage.

    launch.py (Hydra) -> run(cfg) -> validate -> run directory -> registry[method.name | mode](cfg, run_dir)

A user error (MedgptError) prints one sentence, marks summary.json as failed and exits with 1
(HYDRA_FULL_ERROR=1 shows the traceback). In a multirun sweep a failed job is marked failed and
the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from medgpt import registry
from medgpt.config import MODES, validate
from medgpt.errors import ConfigError, MedgptError
from medgpt.tracking import rundir

log = logging.getLogger("medgpt")



def _hydra_context() -> tuple[Path, list[str], bool]:
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task), hc.mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> float | None:
    """Hydra task function; returns the metric a sweep optimises (eval loss, else train loss)."""
    run_dir, overrides, multirun = _hydra_context()
    if cfg.mode != "train":
        return _run_mode(cfg, run_dir)
    rundir.init_run_dir(run_dir, cfg, overrides)
    started = time.time()
    try:
        rundir.write_config(run_dir, cfg)
        validate(cfg)
        stage = registry.get(cfg.method.name, "method")
        _seed(cfg.seed)
        log.info("run directory: %s", run_dir)
        summary = stage(cfg, run_dir)
    except MedgptError as e:
        rundir.finish(run_dir, "failed", {"wall_time_s": round(time.time() - started, 2)}, error=str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}\nrun directory (marked failed): {run_dir}", file=sys.stderr)
        if multirun:
            return float("nan")
        sys.exit(1)
    except KeyboardInterrupt:
        rundir.finish(run_dir, "interrupted", {"wall_time_s": round(time.time() - started, 2)})
        raise
    except BaseException as e:
        rundir.finish(run_dir, "failed", {"wall_time_s": round(time.time() - started, 2)}, error=f"{type(e).__name__}: {e}")
        raise
    summary = rundir.finish(run_dir, "completed", {"wall_time_s": round(time.time() - started, 2), **summary})
    log.info("done: %s", run_dir)
    return summary.get("eval_loss", summary.get("train_loss"))


def _run_mode(cfg: DictConfig, log_dir: Path):
    """Modes that read a finished run (merge, serve, chat, predict, ...): no new run directory, one-sentence errors."""
    try:
        validate(cfg)
        names = registry.available()
        if cfg.mode not in names:
            built = ", ".join(m for m in MODES if m == "train" or m in names)
            raise ConfigError(f"mode={cfg.mode} is not available yet (modes: {', '.join(MODES)}; built so far: {built}).")
        return registry.get(cfg.mode, "mode")(cfg, log_dir)
    except MedgptError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def print_config(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
