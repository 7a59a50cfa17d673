"""One rank of a torchrun launch: `python -m medgpt.launch.worker <run_dir>` (started by medgpt.launch.torchrun).

1. Logging for this rank: rank 0 logs to the console and `<run_dir>/train.log`; every other rank only to
   `<run_dir>/train.rank<N>.log` (RANK comes from torchrun).
2. Loads `<run_dir>/config.yaml` (written by the parent, which composed and validated it: no rank composes).
3. Calls `medgpt.run.train_worker(cfg, run_dir)`, which runs the stage on this rank and returns the summary on
   rank 0. The process-group backend is in MEDGPT_DIST_BACKEND (`backend()`).

Exit: 0 when done (rank 0 leaves its summary in `<run_dir>/.rank0.result.json` for the parent); 128+signal
after RunInterrupted (a checkpoint was saved; rank 0 leaves signal, step and checkpoint in the same file) or a
KeyboardInterrupt; 1 after any other exception, which is first written to `<run_dir>/.rank<N>.error`
(`record_worker_error`) so the parent can name the first failing rank in one sentence.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from medgpt.errors import RunInterrupted
from medgpt.launch.torchrun import BACKEND_ENV, record_worker_error, write_worker_result

log = logging.getLogger("medgpt")

TARGET = "medgpt.run:train_worker"
RESUME_ENV = "MEDGPT_RESUME"  # "1": resume=true (the parent resumes the run; config.yaml keeps the run's own config)
CONSOLE_FORMAT = "[%(name)s] %(message)s"  # as conf/hydra/job_logging/medgpt.yaml
FILE_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
QUIET = {"httpx": logging.WARNING, "urllib3": logging.WARNING, "bitsandbytes": logging.ERROR}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def backend(device: str = "auto") -> str:
    """The process-group backend the launcher chose (MEDGPT_DIST_BACKEND); resolved here when it is not set."""
    value = os.environ.get(BACKEND_ENV)
    if value and value != "auto":
        return value
    from medgpt.launch.torchrun import resolve_backend

    return resolve_backend("auto", device)


def log_file(run_dir: str | Path, rank_: int) -> Path:
    return Path(run_dir) / ("train.log" if rank_ == 0 else f"train.rank{rank_}.log")


def setup_logging(run_dir: str | Path, rank_: int) -> Path:
    """Rank 0: console + train.log (appended: the parent writes there too); rank N: train.rank<N>.log only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    path = log_file(run_dir, rank_)
    file_handler = logging.FileHandler(path, delay=True)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(file_handler)
    if rank_ == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        root.addHandler(console)
    root.setLevel(logging.INFO)
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    return path


def _target(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "train_worker")


def _destroy_process_group() -> None:
    """Leave the process group cleanly if the stage did not (only when torch.distributed is already in use)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a broken group on the way out is not this rank's error
        pass


def main(argv: list[str] | None = None, target: Callable | str | None = None) -> int:
    """Run this rank; returns the exit code. `target(cfg, run_dir)` defaults to medgpt.run.train_worker (imported here)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m medgpt.launch.worker <run_dir>  (started by launcher=torchrun)", file=sys.stderr)
        return 2
    run_dir, me = Path(argv[0]).resolve(), rank()
    setup_logging(run_dir, me)
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_dir / "config.yaml")
        if os.environ.get(RESUME_ENV) == "1":
            cfg.resume = True
        fn = target if callable(target) else _target(target or TARGET)
        summary = fn(cfg, run_dir)
        if me == 0:
            write_worker_result(run_dir, {"status": "completed", "summary": dict(summary or {})})
        return 0
    except RunInterrupted as e:
        if me == 0:
            write_worker_result(run_dir, {"status": "interrupted", "signum": e.signum, "step": e.step, "checkpoint": e.checkpoint})
        log.info("rank %d interrupted by %s at step %s", me, signal.Signals(e.signum).name, e.step)
        return 128 + int(e.signum)
    except KeyboardInterrupt:  # a second signal, or one before training started: stopped at once
        return 128 + int(signal.SIGINT)
    except Exception as e:  # noqa: BLE001 - every failure is recorded for the parent
        try:
            record_worker_error(run_dir, me, e)
        except OSError:
            pass  # no run directory to write to: the log and the exit code still tell
        log.exception("rank %d failed", me)
        return 1
    finally:
        _destroy_process_group()
        for handler in logging.getLogger().handlers:
            handler.flush()


if __name__ == "__main__":
    sys.exit(main())
