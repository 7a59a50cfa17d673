"""mode=compare: runs side by side — the config keys that differ, final metrics, overlaid loss curves.

    python launch.py mode=compare run=outputs/multirun/2026-01-02/10-00-00     # a sweep
    python launch.py mode=compare run=outputs/2026-01-02                         # any folder of runs (searched recursively)
    python launch.py mode=compare run=[outputs/a,outputs/b] compare.sort_by=train_loss

Prints a markdown table (one row per run: the differing config keys, status, steps, train and eval
loss, wall time, and the evaluation results any run has, e.g. `eval/mcq/accuracy` (medgpt.evaluation: eval.after
or mode=eval); sorted by `compare.sort_by`, missing values last) and writes it to comparison.md
beside comparison_loss.png, in `compare.output` or else the compared folder (for a list: the folder
the runs share).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig

from medgpt.errors import ConfigError
from medgpt.registry import register
from medgpt.tracking.runs import METRICS, RunRecord, differing_keys, find_runs, load_run, markdown_table, sort_key

log = logging.getLogger(__name__)


def collect_runs(run, output_dir: Path) -> tuple[list[Path], Path]:
    """The run directories named by `run` and the folder the comparison goes to."""
    if not run:
        raise ConfigError("mode=compare needs run=<sweep or folder of runs> or run=[dirA,dirB].")
    if isinstance(run, list | ListConfig):
        dirs = []
        for item in run:
            path = Path(str(item)).expanduser()
            if not path.is_dir():
                raise ConfigError(f"run: {item} is not a directory.")
            dirs += find_runs(path)
        home = Path(os.path.commonpath([str(p.resolve()) for p in dirs])) if dirs else Path(output_dir)
    else:
        home = Path(str(run)).expanduser()
        if not home.is_dir():
            raise ConfigError(f"run={run} is not a directory: pass a sweep, a folder of runs, or run=[dirA,dirB].")
        dirs = find_runs(home)
    dirs = list(dict.fromkeys(p.resolve() for p in dirs))
    if len(dirs) < 2:
        raise ConfigError(f"run={run} holds {len(dirs)} run director{'y' if len(dirs) == 1 else 'ies'}; compare needs at least two.")
    return dirs, home.resolve() if home.is_dir() else Path(output_dir)


def label(run: RunRecord, home: Path) -> str:
    try:
        return str(run.path.relative_to(home)) or run.path.name
    except ValueError:
        return str(run.path)


def comparison(runs: list[RunRecord], home: Path, sort_by: str, descending: bool) -> tuple[list[str], list[list], list[str]]:
    """Headers, rows (sorted) and the differing keys."""
    keys = differing_keys([r.config for r in runs])
    columns = list(METRICS) + eval_columns(runs)
    if sort_by not in columns and sort_by not in keys:
        known = sorted({k for r in runs for k, v in r.summary.items() if isinstance(v, int | float)} | set(keys))
        if not any(sort_by in r.summary for r in runs):
            raise ConfigError(f"compare.sort_by={sort_by} is neither a metric nor a differing config key (choose from: {', '.join(known)}).")
        columns.append(sort_by)
    runs = sorted(runs, key=lambda r: sort_key(r.metric(sort_by), descending))
    rows = [[label(r, home), *[r.config.get(k) for k in keys], *[r.metric(c) for c in columns]] for r in runs]
    return ["run", *keys, *columns], rows, keys


def eval_columns(runs: list[RunRecord]) -> list[str]:
    """The evaluation keys any of the runs has (eval.after / mode=eval): each suite's main metric, and the judge's
    win rate; sorted. Any other eval/ key can still be a column through compare.sort_by."""
    from medgpt.evaluation.modes import SUITES, suite_module

    shown = {f"eval/{name}/{suite_module(name).MAIN}" for name in SUITES} | {"eval/judge/win_rate"}
    return sorted({k for r in runs for k in r.summary if k in shown})


@register("compare")
def compare(cfg: DictConfig, log_dir: Path) -> dict:
    dirs, home = collect_runs(cfg.run, Path(cfg.paths.output_dir))
    runs = [load_run(d) for d in dirs]
    headers, rows, keys = comparison(runs, home, cfg.compare.sort_by, cfg.compare.descending)
    out = Path(cfg.compare.output).expanduser() if cfg.compare.output else home
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(headers, rows)
    text = (f"# Comparison of {len(runs)} runs under {home}\n\n"
            f"Config keys that differ: {', '.join(f'`{k}`' for k in keys) or 'none'}; sorted by {cfg.compare.sort_by}"
            f"{' (descending)' if cfg.compare.descending else ''}.\n\n{table}")

    from medgpt.tracking.plots import plot_overlay

    by_label = {label(r, home): r for r in runs}
    plot = plot_overlay([(row[0], by_label[row[0]].rows) for row in rows], out / "comparison_loss.png", f"{len(runs)} runs: loss")
    if plot:
        text += "\n![loss curves](comparison_loss.png)\n"
    (out / "comparison.md").write_text(text)
    print(table)
    print(f"table: {out / 'comparison.md'}" + (f"\nplot:  {plot}" if plot else ""))
    return {"runs": len(runs), "table": str(out / "comparison.md"), "plot": str(plot) if plot else None, "differing_keys": keys}
