"""Reading run directories back as table rows: config, overrides, summary and metrics of each run.

Shared by the sweep summary (medgpt.tracking.sweep) and mode=compare (medgpt.tracking.compare).
Reads files only (no torch), so a Hydra callback can use it cheaply after every job.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from medgpt.tracking.rundir import ARTEFACTS, RunDir

METRICS = ("status", "steps", "train_loss", "eval_loss", "wall_time_s")  # the summary.json columns every table shows
NOT_COMPARED = ("paths.", "run", "resume")  # config keys that differ between runs without changing what they do
SKIPPED_FOLDERS = {"checkpoints", "wandb", "tensorboard", "plots", ".submitit", *ARTEFACTS}


@dataclass
class RunRecord:
    path: Path
    config: dict  # flattened: {"method.learning_rate": 0.0002, ...}
    overrides: list[str]  # the command-line overrides of the run (overrides.txt)
    summary: dict
    rows: list[dict]  # metrics.jsonl

    def metric(self, key: str):
        value = self.summary.get(key, self.config.get(key))
        return None if isinstance(value, float) and math.isnan(value) else value


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return rows


def flatten(node, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (shown as JSON)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def load_run(path: Path) -> RunRecord:
    run = RunDir(path)
    config = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
    overrides = run.overrides.read_text().splitlines() if run.overrides.exists() else []
    summary = run.read_summary().to_dict() if run.summary_path.exists() else {}  # a dead owner's "running" reads as crashed
    return RunRecord(run.path, flatten(config or {}), [o for o in overrides if o.strip()], summary, read_jsonl(run.metrics))


def is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    return run.summary_path.exists() and (run.config.exists() or run.overrides.exists())


def find_runs(root: Path) -> list[Path]:
    """Run directories at or under `root` (a run, a sweep, or any folder of runs), in path order."""
    root = Path(root)
    found = []
    for summary in root.rglob("summary.json"):
        run = summary.parent
        if is_run_dir(run) and not SKIPPED_FOLDERS & set(run.relative_to(root).parts):
            found.append(run)
    return sorted(found, key=lambda p: [job_number(part) for part in p.relative_to(root).parts])


def job_number(name: str) -> tuple[int, str]:
    """Sweep jobs are `<num>-<overrides>`: sort 2 before 10."""
    match = re.match(r"\d+", name)
    return (int(match.group()) if match else -1, name)


def differing_keys(configs: list[dict]) -> list[str]:
    """Config keys whose values are not the same in every run (missing counts as a value)."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if not k.startswith(NOT_COMPARED) and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.5g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    text = str(value)
    try:  # overrides are strings: shorten long floats such as Optuna's 0.00012345678901
        number = float(text)
        return f"{number:.5g}" if len(text) > 8 and not text.isdigit() else text
    except ValueError:
        return text


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, headers: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def sort_key(value, descending: bool):
    """Sorts numbers by value (descending when asked) and puts missing values last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, -value if descending else value, "")
    return (1, 0.0, str(value))
