"""The sweep summary: sweep_summary.csv, sweep_summary.md and sweep_loss.png at a multirun's root.

    python launch.py -m method.learning_rate=1e-4,2e-4 lora.r=8,16
    outputs/multirun/<date>/<time>/{0,1,2,3}-<overrides>/    one full run directory per job
    outputs/multirun/<date>/<time>/sweep_summary.{csv,md}     one row per job: overrides, status, losses, wall time
    outputs/multirun/<date>/<time>/sweep_loss.png             the jobs' loss curves on one axes

`SweepSummaryCallback` is registered under `hydra.callbacks` in conf/config.yaml. Hydra calls
`on_job_end` after every job (so the summary exists, and is current, even if the sweep dies) and
`on_multirun_end` once at the end, after the Optuna sweeper has written optimization_results.yaml,
whose best trial the summary then names. The best job is the one with the best `sweep.metric`
in `sweep.direction` among the completed jobs.

Ctrl-C stops a sweep: the job being trained saves a checkpoint and is marked interrupted, and medgpt.run
raises KeyboardInterrupt to end the sweep. That passes through Hydra without `on_job_end` or
`on_multirun_end`, up to the interpreter, which would print a traceback; so for the length of the sweep
this callback also handles an uncaught KeyboardInterrupt (`sys.excepthook`): it writes the summary of the
jobs so far and prints one line instead. The process still ends as interrupted by SIGINT (exit status 130).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from medgpt.tracking.runs import METRICS, RunRecord, fmt, is_run_dir, job_number, load_run, markdown_table, write_csv

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    def __init__(self) -> None:
        self._config = None  # the sweep's config while a sweep runs
        self._previous_hook = None

    def on_multirun_start(self, config, **kwargs) -> None:
        self._config, self._previous_hook = config, sys.excepthook
        sys.excepthook = self._excepthook

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._write(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        self._restore_hook()
        path = self._write(config)
        if path:
            log.info("sweep summary: %s", path)
            print((path.parent / "sweep_summary.md").read_text())

    def _excepthook(self, kind, value, traceback) -> None:
        """Ctrl-C ended the sweep: the summary of the jobs so far and one line, not a traceback."""
        config, previous = self._config, self._previous_hook or sys.__excepthook__
        self._restore_hook()
        if config is None or not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        path = self._write(config)
        where = f"summary: {path.parent / 'sweep_summary.md'}" if path else f"no job had started; sweep directory: {config.hydra.sweep.dir}"
        print(f"sweep stopped by Ctrl-C; {where}", file=sys.stderr, flush=True)

    def _restore_hook(self) -> None:
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook or sys.__excepthook__
        self._config = self._previous_hook = None

    @staticmethod
    def _write(config) -> Path | None:
        try:  # a summary must never fail a job or the sweep
            return write_sweep_summary(Path(config.hydra.sweep.dir), config.sweep.metric, config.sweep.direction)
        except Exception as e:  # noqa: BLE001
            log.warning("the sweep summary could not be written: %s: %s", type(e).__name__, e)
            return None


def parse_overrides(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) if "=" in line else (line, "") for line in lines)


def best_job(jobs: list[RunRecord], metric: str, direction: str) -> RunRecord | None:
    scored = [(j.metric(metric), j) for j in jobs if j.summary.get("status") == "completed"]
    scored = [(v, j) for v, j in scored if isinstance(v, int | float) and math.isfinite(v)]
    if not scored:
        return None
    pick = max if direction == "maximize" else min
    return pick(scored, key=lambda vj: vj[0])[1]


def write_sweep_summary(sweep_dir: Path, metric: str = "eval_loss", direction: str = "minimize") -> Path | None:
    """(Re)writes the summary files from the job directories found so far; returns the csv path (None before any job)."""
    job_dirs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and is_run_dir(p)), key=lambda p: job_number(p.name))
    if not job_dirs:
        return None
    jobs = [load_run(d) for d in job_dirs]
    overrides = [parse_overrides(j.overrides) for j in jobs]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    common = [f"{k}={overrides[0][k]}" for k in keys if k not in varying]
    columns = list(METRICS) + ([metric] if metric not in METRICS else [])
    best = best_job(jobs, metric, direction)
    headers = ["job", *varying, *columns, "best"]
    rows = [[job_number(j.path.name)[0], *[o.get(k) for k in varying], *[j.metric(c) for c in columns], "*" if j is best else ""]
            for j, o in zip(jobs, overrides)]

    csv_path = Path(sweep_dir) / "sweep_summary.csv"
    with replaced(csv_path) as tmp:
        write_csv(tmp, [*headers, "overrides", "run_dir"], [[*r, " ".join(j.overrides), str(j.path)] for r, j in zip(rows, jobs)])

    lines = [f"# Sweep {sweep_dir}\n", f"{len(jobs)} jobs; metric: {metric} ({direction})"]
    if common:
        lines.append(f"; common overrides: `{' '.join(common)}`")
    lines += ["\n\n", markdown_table(headers, rows), "\n"]
    if best is not None:
        label = " ".join(f"{k}={fmt(o.get(k))}" for k, o in [(k, overrides[jobs.index(best)]) for k in varying])
        lines.append(f"Best job: {job_number(best.path.name)[0]} ({label or best.path.name}): {metric} = {fmt(best.metric(metric))}\n")
    failed = [job_number(j.path.name)[0] for j in jobs if j.summary.get("status") == "failed"]
    if failed:
        lines.append(f"Failed jobs: {', '.join(map(str, failed))} (their summary.json has the error)\n")
    interrupted = [job_number(j.path.name)[0] for j in jobs if j.summary.get("status") == "interrupted"]
    if interrupted:
        lines.append(f"Interrupted jobs: {', '.join(map(str, interrupted))} (Ctrl-C; continue one with "
                     "`python launch.py run=<its directory> resume=true`)\n")
    optuna = Path(sweep_dir) / "optimization_results.yaml"
    if optuna.exists():
        result = yaml.safe_load(optuna.read_text()) or {}
        params = " ".join(f"{k}={fmt(v)}" for k, v in (result.get("best_params") or {}).items())
        lines.append(f"Optuna best trial (optimization_results.yaml): {params}: {metric} = {fmt(result.get('best_value'))}\n")

    from medgpt.tracking.plots import plot_overlay  # matplotlib only when there is something to plot

    curves = [(f"{job_number(j.path.name)[0]}: " + " ".join(f"{k}={fmt(o.get(k))}" for k in varying), j.rows) for j, o in zip(jobs, overrides)]
    with replaced(Path(sweep_dir) / "sweep_loss.png") as tmp:
        if plot_overlay(curves, tmp, f"sweep {Path(sweep_dir).name}: loss per job"):
            lines.append("\n![loss curves of the jobs](sweep_loss.png)\n")
    with replaced(Path(sweep_dir) / "sweep_summary.md") as tmp:
        tmp.write_text("".join(lines))
    return csv_path


@contextmanager
def replaced(path: Path):
    """Write to a temporary file beside `path`, then move it over `path`: parallel jobs (cluster launchers) may
    rewrite the summary at the same time, and a reader never sees half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
