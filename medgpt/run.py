"""One run: validate the composed config, claim the run directory once, dispatch to a stage.

    launch.py (Hydra) -> run(cfg) -> validate -> RunDir.claim -> launcher=local:    the stage, in this process
                                                               -> launcher=torchrun: workers (medgpt.launch), each
                                                                  reading the saved config.yaml -> train_worker()

A bad value is refused before any directory is touched. A user error (MedgptError) during the run
prints one sentence, marks summary.json as failed and exits with 1 (HYDRA_FULL_ERROR=1 shows the
traceback). SIGINT/SIGTERM during training save a checkpoint and mark the run "interrupted";
`python launch.py run=<dir> resume=true` continues it in place (medgpt.tracking.resume), as it does
a run that crashed (killed, preempted: its summary says running but its owner is gone). In a
multirun sweep a failed job is marked failed, returns NaN and the sweep goes on (Ctrl-C stops the
sweep); a job returns its `sweep.metric` for the sweeper (Optuna). W&B / TensorBoard (logger=...)
are started by the process that trains on rank 0 and get the final summary (medgpt.tracking.loggers).
With eval.after=[mcq, ...] a completed run evaluates itself first, in this process (medgpt.evaluation.after), so
its eval/<suite>/<metric> keys are in that summary, the end table and the sweep's metric.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
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
from medgpt.evaluation.after import after_training
from medgpt.evaluation.after import check as check_eval_after
from medgpt.tracking import loggers
from medgpt.tracking.resume import checkpoint_step, prepare_resume, truncate_metrics
from medgpt.tracking.rundir import RunDir, resolve_run

log = logging.getLogger("medgpt")
RESUMABLE = ("interrupted", "crashed")


def _hydra_context() -> tuple[Path, list[str], bool, bool]:
    """(the directory Hydra made, the command-line overrides, multirun?, did the user name the directory?)"""
    hc = HydraConfig.get()
    named = any(o.split("=", 1)[0].lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") for o in hc.overrides.hydra)
    return Path(hc.runtime.output_dir), list(hc.overrides.task), hc.mode == RunMode.MULTIRUN, named


def run(cfg: DictConfig) -> float | None:
    """Hydra task function; returns the metric a sweep optimises (summary[sweep.metric]; NaN for a failed job)."""
    hydra_dir, overrides, multirun, named = _hydra_context()
    if cfg.mode != "train":
        return _run_mode(cfg, hydra_dir)
    try:
        if cfg.resume:
            cfg, run_dir, resumed = _resume(cfg)
        else:
            validate(cfg)  # a bad value is refused before any directory is claimed or written
            _preflight(cfg)
            check_eval_after(cfg)  # eval.after / pipeline.eval: names, values, files (medgpt.evaluation.after)
            run_dir, resumed = RunDir.claim(hydra_dir, named_by_user=named), {}
    except MedgptError as e:
        _remove_if_empty(hydra_dir)  # the directory Hydra made for a run that does not happen
        return _refused(e, multirun)
    if run_dir.path != hydra_dir:
        _remove_if_empty(hydra_dir)
    if not cfg.resume:
        run_dir.write_config(cfg)
    launcher = cfg.launcher.name if "launcher" in cfg else "local"
    distributed = _distributed_info(cfg)
    run_dir.start(cfg, None if cfg.resume else overrides, distributed)
    earlier_s = resumed.pop("wall_time_s", 0.0)
    run_dir.begin_summary({**resumed, **distributed})  # a resumed run: its earlier summary was read by prepare_resume
    try:
        if launcher == "torchrun" and cfg.launcher.dry_run:
            return _dry_run(cfg, run_dir)
        return _execute(cfg, run_dir, multirun, earlier_s, launcher)
    finally:
        run_dir.release()


def _execute(cfg: DictConfig, run_dir: RunDir, multirun: bool, earlier_s: float, launcher: str) -> float | None:
    """Run the stage (here, or in torchrun workers) and record how it ended."""
    started = time.time()
    wall = lambda: {"wall_time_s": round(time.time() - started + earlier_s, 2)}  # noqa: E731
    try:
        log.info("run directory: %s", run_dir)
        if launcher == "torchrun":
            from medgpt.launch.run import launch_workers

            summary = launch_workers(cfg, run_dir)
        else:
            summary = _train_here(cfg, run_dir)
    except RunInterrupted as e:
        _end(run_dir, "interrupted", {**wall(), "steps": e.step, "checkpoint": e.checkpoint})
        print(f"interrupted at step {e.step}; checkpoint: {e.checkpoint}\n"
              f"continue with: python launch.py {shlex.quote(f'run={run_dir}')} resume=true", file=sys.stderr)
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
    summary = run_dir.finish("completed", {**wall(), **summary}).to_dict()
    summary = after_training(cfg, run_dir, summary)  # eval.after: the run evaluates itself (adds eval/<suite>/<metric>)
    loggers.finish(summary, "completed")
    log.info("done: %s", run_dir)
    print(end_table(summary, run_dir.path), flush=True)
    return _sweep_metric(cfg, summary)


def end_table(summary: dict, run_dir: Path) -> str:
    """The end of a completed run in a few lines, from its summary.json: steps, train loss first -> last, eval loss
    before -> after, tokens/s, wall time and where the trained weights are (a pipeline: one line per stage)."""
    def num(value, spec: str = ".4f") -> str:
        return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"

    artefact = summary.get("merged") or (str(run_dir / summary["artefact"]) if summary.get("artefact") else summary.get("final_run"))
    rows = [("steps", num(summary.get("steps"), "d") if isinstance(summary.get("steps"), int) else "-"),
            ("train loss", f"{num(summary.get('train_loss_first'))} -> {num(summary.get('train_loss'))}"),
            ("eval loss", f"{num(summary.get('eval_loss_before'))} -> {num(summary.get('eval_loss'))}"),
            ("tokens/s", num(summary.get("tokens_per_s"), ".1f")),
            ("wall time", _duration(summary.get("wall_time_s"))),
            ("artefact", artefact or "-")]
    evals = [f"{k[5:]} {num(v, '.3f')}" for k, v in summary.items() if k.count("/") == 2 and k.startswith("eval/")
             and k.endswith(("/accuracy", "/rougeL", "/overall", "/win_rate"))]  # eval.after (medgpt.evaluation.after)
    if evals:
        rows.insert(-1, ("eval", ", ".join(evals)))
    if summary.get("stages"):  # method=pipeline: the stages' own figures instead of the first three
        rows = [(f"stage {r.get('stage')}", f"{r.get('steps', '-')} steps, eval loss {num(r.get('eval_loss_before'))} -> "
                 f"{num(r.get('eval_loss'))}") for r in summary["stages"]] + rows[4:]
    return "\n".join(f"  {name:<11} {value}" for name, value in rows)


def _duration(seconds) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes} min {rest:02d} s"


def _train_here(cfg: DictConfig, run_dir: RunDir) -> dict:
    """The stage in this process (launcher=local, and every torchrun worker)."""
    stage = registry.get(cfg.method.name, "method")
    _seed(cfg.seed)
    if run_dir.is_main:
        loggers.start(cfg, run_dir.path)
    return stage(cfg, run_dir)


def train_worker(cfg: DictConfig, run_dir: Path) -> dict:
    """A torchrun worker (medgpt.launch.worker): the stage on this rank; rank 0 writes what the run keeps.

    The parent (run() above) owns the directory, its lock and heartbeat, and the final status."""
    run = RunDir(run_dir)
    status = "failed"
    try:
        summary = _train_here(cfg, run)
        status = "completed"
    except RunInterrupted:
        status = "interrupted"
        raise
    finally:
        if run.is_main:
            loggers.finish(run.read_summary().to_dict(), status)
    if run.is_main:
        run.update_summary(summary)
    return summary


def _preflight(cfg: DictConfig) -> None:
    """launcher=torchrun: refuse what cannot start (busy port, too few GPUs, a node other than 0) before any directory exists."""
    if "launcher" not in cfg or cfg.launcher.name != "torchrun":
        return
    if cfg.launcher.node_rank > 0 and not cfg.launcher.dry_run:
        raise ConfigError(f"launcher.node_rank={cfg.launcher.node_rank}: start the run on node 0 (it makes the one run directory); "
                          "on the other nodes run the command that launcher.dry_run=true prints there.")
    from medgpt.launch.torchrun import preflight

    if not cfg.launcher.dry_run:
        preflight(cfg.launcher, cfg.hardware.device)


def _dry_run(cfg: DictConfig, run_dir: RunDir) -> None:
    """launcher.dry_run=true: the run directory with its config.yaml (the commands read it), the commands, nothing started."""
    from medgpt.launch.run import launch_workers

    launch_workers(cfg, run_dir)
    run_dir.finish("prepared", {"note": "launcher.dry_run=true: start the printed command(s); the workers read config.yaml"})
    print(f"run directory (prepared, nothing started): {run_dir}")


def _distributed_info(cfg: DictConfig) -> dict:
    """world_size, backend and launcher, for env.json and summary.json."""
    if "launcher" not in cfg or cfg.launcher.name == "local":
        return {"world_size": 1, "backend": None, "launcher": "local"}
    from medgpt.launch.run import distributed_info

    return distributed_info(cfg)


def _refused(e: MedgptError, multirun: bool) -> float:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"error: {e}", file=sys.stderr)
    if multirun:
        return float("nan")
    sys.exit(1)


def _end(run_dir: RunDir, status: str, summary: dict, error: str | None = None) -> dict:
    """summary.json with the final status, and the same summary to W&B / TensorBoard."""
    data = run_dir.finish(status, summary, error=error).to_dict()
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


def _resume(cfg: DictConfig) -> tuple[DictConfig, RunDir, dict]:
    """resume=true: the saved config of run=<dir>, that directory (locked again), and what the run had done."""
    if not cfg.run:
        raise ConfigError("resume=true needs run=<run directory> (or run=latest for the newest interrupted or crashed run).")
    path = resolve_run(cfg.run, Path(cfg.paths.output_dir), status=RESUMABLE).resolve()
    run_dir = RunDir(path, rank=0)
    run_dir.take_over()
    try:
        saved, checkpoint, previous = prepare_resume(run_dir, cfg)
        validate(saved)
    except BaseException:
        run_dir.release()
        raise
    step = checkpoint_step(checkpoint)
    dropped = truncate_metrics(path, step)
    log.info("resuming %s from %s (step %d%s)", path, checkpoint.name, step, f"; {dropped} later metrics rows dropped" if dropped else "")
    return saved, run_dir, {"wall_time_s": previous.get("wall_time_s") or 0.0, "resumed_from": str(checkpoint)}


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

