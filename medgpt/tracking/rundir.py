"""The run directory: created once per run, self-explaining afterwards (layout in the README).

    config.yaml  overrides.txt  env.json  metrics.jsonl  summary.json  plots/loss.png
    adapter/ or model/ (with tokenizer + chat template)  checkpoints/  train.log
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medgpt.errors import ConfigError

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "omegaconf", "deepspeed",
             "bitsandbytes", "flash-attn", "vllm", "wandb", "gguf")


def write_json(path: Path, data: Any) -> None:
    """Atomic write: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def git_state(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def env_info(root: Path) -> dict:
    import torch

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    device = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        device.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count())
    return {"python": sys.version.split()[0], "platform": platform.platform(), "libraries": versions, "device": device,
            "git": git_state(root), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def init_run_dir(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "overrides.txt").write_text("".join(f"{o}\n" for o in overrides))
    write_json(run_dir / "env.json", env_info(Path(cfg.paths.root)))
    write_json(run_dir / "summary.json", {"status": "running"})


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def finish(run_dir: Path, status: str, summary: dict | None = None, error: str | None = None) -> dict:
    """Write summary.json with the final status (completed | failed | interrupted)."""
    data = {"status": status, **(summary or {})}
    if error:
        data["error"] = error
    write_json(run_dir / "summary.json", data)
    return data


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def resolve_run(run: str | None, output_dir: Path, status: str = "completed") -> Path:
    """`run=latest` -> the newest run with `status` (completed) under outputs/; `run=<path>` -> that directory."""
    if not run:
        raise ConfigError("this mode reads a finished run: pass run=<run directory> or run=latest.")
    if not isinstance(run, str | Path):
        raise ConfigError(f"run={list(run)} names several runs; this mode reads one (a list is for mode=compare).")
    if run == "latest":
        runs = [p.parent for p in Path(output_dir).glob("**/summary.json") if read_summary(p.parent).get("status") == status]
        if not runs:
            raise ConfigError(f"run=latest: no {status} run under {output_dir}; train one first (python launch.py).")
        return max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)
    path = Path(run).expanduser()
    if not (path / "config.yaml").exists():
        raise ConfigError(f"run={run} is not a run directory (it has no config.yaml).")
    return path


def trained_run(run_dir: Path) -> Path:
    """The run that holds the weights: a pipeline's root directory stands for its last stage (`final_run`)."""
    final = read_summary(run_dir).get("final_run")
    if final and not any((run_dir / d).is_dir() for d in ("merged", "model", "adapter")) and (Path(final) / "config.yaml").exists():
        return Path(final)
    return run_dir
