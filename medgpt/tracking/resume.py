"""Continuing an interrupted run: `python launch.py run=<dir> resume=true`.

The run continues in its own directory with its saved config.yaml (command-line overrides other
than run= and resume= are ignored), from its newest complete checkpoint (`checkpoints/checkpoint-<step>/`,
written on the interrupt): the Trainer restores weights, optimiser, scheduler, RNG states and the
position in the data, so the steps after it are those the uninterrupted run would have made.
metrics.jsonl keeps its rows up to the checkpoint's step (rows written after it are dropped, so none
is duplicated) and the stage skips rows it logs before training restarts (the eval before training).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from medgpt.errors import ConfigError
from medgpt.tracking.rundir import read_summary

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json was written (a checkpoint cut short has none)."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def truncate_metrics(run_dir: Path, step: int) -> int:
    """Keeps metrics.jsonl rows with step <= `step`; returns how many were dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def prepare_resume(run_dir: Path, defaults: DictConfig) -> tuple[DictConfig, Path, dict]:
    """The saved config (resume=true), the checkpoint to continue from, and the run's previous summary; one sentence if it cannot."""
    previous = read_summary(run_dir)
    if previous.get("status") == "completed":
        raise ConfigError(f"run {run_dir} has already completed; there is nothing to resume.")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"run {run_dir} has no checkpoint to resume from (it stopped before saving one); start it again without resume=true.")
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    if cfg.method.name == "pipeline":
        raise ConfigError("resume=true cannot continue a pipeline (method=pipeline): start the pipeline again.")
    for key in ("watchdog", "sweep", "compare", "logger", "launcher", "fsdp"):  # keys added after the run was made take today's defaults
        if key not in cfg:
            cfg[key] = defaults[key]
    cfg.resume = True
    return cfg, checkpoint, previous
