"""One run: validate the composed config, create the run directory once, dispatch to a stage.

    launch.py (Hydra) -> run(cfg) -> validate -> run directory -> registry[method.name | mode](cfg, run_dir)

A user error (MedgptError) prints one sentence, marks summary.json as failed and exits with 1
(HYDRA_FULL_ERROR=1 shows the traceback). SIGINT/SIGTERM during training save a checkpoint and mark
the run "interrupted"; `python launch.py run=<dir> resume=true` continues it in place
(medgpt.tracking.resume). In a multirun sweep a failed job is marked failed, returns NaN and the
sweep goes on (Ctrl-C stops the sweep); a job returns its `sweep.metric` for the sweeper (Optuna).
W&B / TensorBoard (logger=...) are started here and get the final summary (medgpt.tracking.loggers).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from medgpt import registry
from medgpt.config import MODES, validate
from medgpt.errors import ConfigError, MedgptError, RunInterrupted
from medgpt.tracking import loggers, rundir
from medgpt.tracking.resume import checkpoint_step, prepare_resume, truncate_metrics

log = logging.getLogger("medgpt")


def _hydra_context() -> tuple[Path, list[str], bool]:
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), list(hc.overrides.task), hc.mode == RunMode.MULTIRUN


def run(cfg: DictConfig) -> float | None:
    """Hydra task function; returns the metric a sweep optimises (summary[sweep.metric]; NaN for a failed job)."""
    run_dir, overrides, multirun = _hydra_context()
    if cfg.mode != "train":
        return _run_mode(cfg, run_dir)
    resumed = {}  # resume=true: the checkpoint the run continues from and the wall time it had spent
    if cfg.resume:
        cfg, run_dir, resumed = _resume(cfg, run_dir)
    else:
        rundir.init_run_dir(run_dir, cfg, overrides)
    started, earlier = time.time(), resumed.pop("wall_time_s", 0.0)
    wall = lambda: {"wall_time_s": round(time.time() - started + earlier, 2), **resumed}  # noqa: E731
    try:
        if not cfg.resume:
            rundir.write_config(run_dir, cfg)
        validate(cfg)
        stage = registry.get(cfg.method.name, "method")
        _seed(cfg.seed)
        log.info("run directory: %s", run_dir)
        loggers.start(cfg, run_dir)
        summary = stage(cfg, run_dir)
    except RunInterrupted as e:
        _end(run_dir, "interrupted", {**wall(), "steps": e.step, "checkpoint": e.checkpoint})
        print(f"interrupted at step {e.step}; checkpoint: {e.checkpoint}\ncontinue with: python launch.py run={run_dir} resume=true",
              file=sys.stderr)
        if multirun and e.signum != signal.SIGINT:
            return float("nan")  # e.g. SIGTERM to one cluster job: the sweep goes on
        if multirun:
            raise KeyboardInterrupt from None  # Ctrl-C stops the whole sweep
        sys.exit(128 + e.signum)
    except MedgptError as e:
        _end(run_dir, "failed", wall(), error=str(e))
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}\nrun directory (marked failed): {run_dir}", file=sys.stderr)
        if multirun:
            return float("nan")
        sys.exit(1)
    except KeyboardInterrupt:
        _end(run_dir, "interrupted", wall())
        raise
    except BaseException as e:
        _end(run_dir, "failed", wall(), error=f"{type(e).__name__}: {e}")
        if multirun and isinstance(e, Exception) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            log.exception("job failed; the sweep goes on")
            print(f"error: {type(e).__name__}: {e}\nrun directory (marked failed): {run_dir}", file=sys.stderr)
            return float("nan")
        raise
    summary = _end(run_dir, "completed", {**wall(), **summary})
    log.info("done: %s", run_dir)
    return _sweep_metric(cfg, summary)


def _end(run_dir: Path, status: str, summary: dict, error: str | None = None) -> dict:
    """summary.json with the final status, and the same summary to W&B / TensorBoard."""
    data = rundir.finish(run_dir, status, summary, error=error)
    loggers.finish(data, status)
    return data


def _sweep_metric(cfg: DictConfig, summary: dict) -> float:
    """summary[sweep.metric] (eval_loss, else train_loss when there is no eval data); NaN when missing."""
    metric = cfg.sweep.metric
    value = summary.get(metric)
    if value is None and metric == "eval_loss":
        value = summary.get("train_loss")
    if not isinstance(value, int | float) or isinstance(value, bool):
        log.warning("sweep.metric=%s is not a number in summary.json; the sweep gets NaN", metric)
        return float("nan")
    return float(value) if math.isfinite(value) else float("nan")


def _resume(cfg: DictConfig, hydra_dir: Path) -> tuple[DictConfig, Path, dict]:
    """resume=true: the saved config of run=<dir>, that directory, and what the run had done; one sentence and exit 1 if it cannot."""
    try:
        if not cfg.run:
            raise ConfigError("resume=true needs run=<run directory> (or run=latest for the newest interrupted run).")
        run_dir = rundir.resolve_run(cfg.run, Path(cfg.paths.output_dir), status="interrupted").resolve()
        saved, checkpoint, previous = prepare_resume(run_dir, cfg)
    except MedgptError as e:
        _remove_if_empty(hydra_dir)  # the directory Hydra made for a run that does not happen
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    step = checkpoint_step(checkpoint)
    dropped = truncate_metrics(run_dir, step)
    log.info("resuming %s from %s (step %d%s)", run_dir, checkpoint.name, step, f"; {dropped} later metrics rows dropped" if dropped else "")
    rundir.write_json(run_dir / "summary.json", {"status": "running", "resumed_from": str(checkpoint)})
    return saved, run_dir, {"wall_time_s": previous.get("wall_time_s", 0.0), "resumed_from": str(checkpoint)}


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
    finally:
        _remove_if_empty(log_dir)


def _remove_if_empty(path: Path) -> None:
    """Hydra creates a directory for every invocation; one that nothing was written to is not a run, so it goes."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)
