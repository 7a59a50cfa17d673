"""The parent's side of launcher=torchrun, for medgpt.run: launch the workers and turn the outcome into what run.py handles.

    launch_workers(cfg, run_dir) -> rank 0's summary          (config.yaml must be written first)
        interrupted -> raises RunInterrupted(signum, step, checkpoint)   (run.py marks the run "interrupted")
        a rank failed -> raises WorkerFailed (a MedgptError): the first failing rank in one sentence
    distributed_info(cfg) -> {"world_size", "backend", "launcher"} for env.json and summary.json (never raises)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from medgpt.errors import ConfigError, MedgptError, RunInterrupted
from medgpt.launch.torchrun import _settings, launch, resolve_backend
from medgpt.launch.worker import RESUME_ENV

log = logging.getLogger("medgpt.launch")


class WorkerFailed(MedgptError):
    """A rank of a torchrun launch failed (the message names the first failing rank and its error)."""


def _device(cfg: DictConfig) -> str:
    hardware = cfg.get("hardware") if isinstance(cfg, DictConfig) else getattr(cfg, "hardware", None)
    return str(getattr(hardware, "device", None) or "auto")


def _log_hint(run_dir: Path, rank: int | None) -> str:
    if rank is None:
        return ""
    name = "train.log" if rank == 0 else f"train.rank{rank}.log"
    return f" (its log: {run_dir / name})" if (run_dir / name).exists() else ""


def launch_workers(cfg: DictConfig, run_dir: Any, **kwargs) -> dict:
    """Run the training ranks for `run_dir` (its config.yaml already written) and return rank 0's summary.

    launcher.dry_run=true prints the commands, starts nothing and returns {"dry_run": True}. `kwargs` go to
    medgpt.launch.torchrun.launch (env, timeout, module).
    """
    path = Path(run_dir)  # a RunDir is os.PathLike
    if cfg.get("resume"):  # the workers read config.yaml, which keeps resume=false: tell them
        kwargs["env"] = {**(kwargs.get("env") or {}), RESUME_ENV: "1"}
    outcome = launch(cfg.launcher, path, device=_device(cfg), **kwargs)
    if outcome.dry_run:
        return {"dry_run": True}
    if outcome.interrupted:
        done = outcome.interrupt or {}
        raise RunInterrupted(int(outcome.signum), int(done.get("step") or 0), done.get("checkpoint"))
    if outcome.error:
        raise WorkerFailed(outcome.error.rstrip(".") + _log_hint(path, outcome.failed_rank) + ".")
    return dict(outcome.summary or {})


def distributed_info(cfg: DictConfig) -> dict:
    """world_size (nproc_per_node x nnodes), the backend the ranks will use, and the launcher's name."""
    launcher = cfg.launcher
    try:
        nproc, nnodes, *_ = _settings(launcher)
        world_size = nproc * nnodes
    except ConfigError:
        world_size = None
    try:
        backend = resolve_backend(getattr(launcher, "backend", "auto"), _device(cfg))
    except ConfigError:
        backend = getattr(launcher, "backend", None)
    return {"world_size": world_size, "backend": backend, "launcher": str(getattr(launcher, "name", "torchrun"))}
