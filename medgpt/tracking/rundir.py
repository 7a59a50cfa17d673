"""The run directory: the one module that knows its layout, its summary.json fields and who owns it.

    config.yaml  overrides.txt  env.json  metrics.jsonl  summary.json  plots/loss.png  train.log
    adapter/ | model/ (tokenizer + chat template)   merged/   checkpoints/   eval/<suite>/
    .lock  .owner.json                               (liveness: who runs it, on which host, last heartbeat)

Guarantees (tested in tests/test_rundir.py):
- **Never shared**: a training run claims its directory with an exclusive lock (`.lock`, flock) held
  for its whole life. A second run aimed at the same directory — started in the same second with the
  default name, or given the same `hydra.run.dir` — either gets a fresh `-2`, `-3`, ... directory
  (default names) or is refused in one sentence (a directory the user named). A directory that holds
  another run (finished, failed or crashed) is never trained into again, except by `resume=true`.
- **Never half-written**: summary.json and env.json are replaced atomically; updates are
  read-modify-write under a short lock (`.update.lock`), so modes that add to a finished run (merge,
  eval, export) never lose a field and never touch config.yaml.
- **Crash-detected**: `.owner.json` records pid, host and a heartbeat (every 30 s). A run whose
  summary says `running` but whose owner is gone (its lock is free on this host, or its heartbeat is
  older than 5 minutes elsewhere) reads as `crashed`, and `resume=true` continues it from its last
  checkpoint.
- Only the main process (rank 0 of a multi-process run) writes; other ranks only read.

`RunSummary` is the typed, versioned summary.json: the fields every training stage reports are
attributes; the fields a stage declares for itself (e.g. DPO's reference) live in `extra` and are
written at the top level beside them. Summaries written before version 2 load unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medgpt.errors import ConfigError

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core", "omegaconf", "deepspeed",
             "bitsandbytes", "flash-attn", "vllm", "wandb", "gguf", "trl")
ARTEFACTS = ("merged", "model", "adapter")  # full weights first: what serving and init_from prefer
SUMMARY_VERSION = 2
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a heartbeat this old on another host: the owner is gone
FINAL = ("completed", "failed", "interrupted")


@dataclass
class RunSummary:
    """summary.json. Every field is optional because a run can fail at any point; `status` always exists."""

    status: str = "running"  # running | completed | failed | interrupted | crashed (read back only)
    version: int = SUMMARY_VERSION
    stage: str | None = None
    error: str | None = None
    # what was trained, from what
    model: str | None = None
    init_from: str | None = None
    base_model_path: str | None = None  # the folder the adapter applies to (serving and merging load it)
    root_model_path: str | None = None  # the pretrained model at the start of a chain of runs
    dtype: str | None = None
    template: str | None = None
    stop_token_ids: list[int] | None = None  # the template's end-of-turn ids: generation stops on them
    adapter: str | None = None  # lora.name
    artefact: str | None = None  # adapter | model
    # how it went
    steps: int | None = None
    epochs: float | None = None
    train_loss: float | None = None
    train_loss_first: float | None = None
    train_loss_mean: float | None = None
    eval_loss_before: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    tokens_seen: int | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    early_stopped_at_step: int | None = None
    peak_memory_gb: float | None = None  # measured: CUDA max allocated, or the process' peak RSS on CPU
    # where it ran
    world_size: int | None = None
    backend: str | None = None
    launcher: str | None = None
    # resume / interrupt
    checkpoint: str | None = None
    resumed_from: str | None = None
    data: dict | None = None
    plan: dict | None = None
    samples: list | None = None
    extra: dict = field(default_factory=dict)  # the stage's own fields (declared in its Stage), written at the top level

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        known = set(cls.fields())
        summary = cls(**{k: v for k, v in data.items() if k in known})
        summary.extra = {k: v for k, v in data.items() if k not in known}
        if "version" not in data:
            summary.version = 1  # written before the typed summary; same keys, no version
        return summary

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.fields()}
        return {**out, **self.extra}

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key) if key in self.fields() else self.extra.get(key)
        return default if value is None else value

    def update(self, values: dict) -> RunSummary:
        for key, value in values.items():
            if key in self.fields():
                setattr(self, key, value)
            else:
                self.extra[key] = value
        return self


def write_json(path: Path, data: Any) -> None:
    """Atomic write: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def git_state(root: Path) -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def env_info(root: Path, distributed: dict | None = None) -> dict:
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
            "distributed": distributed or {"world_size": 1, "backend": None, "launcher": "local"},
            "git": git_state(root), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def process_rank() -> int:
    """This process' global rank under torchrun (RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0") or 0)


class RunDir:
    """One run directory. `RunDir(path)` reads one; `RunDir.claim(...)` makes (or takes over) one for a new run."""

    def __init__(self, path: Path | str, rank: int | None = None):
        self.path = Path(path)
        self.rank = process_rank() if rank is None else rank
        self._lock_fd: int | None = None
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- layout: the only place that spells these names ---
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.path / "overrides.txt"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def loss_plot(self) -> Path:
        return self.path / "plots" / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def owner_path(self) -> Path:
        return self.path / ".owner.json"

    def log_file(self, rank: int | None = None) -> Path:
        rank = self.rank if rank is None else rank
        return self.path / ("train.log" if rank == 0 else f"train.rank{rank}.log")

    def artefact(self, kind: str) -> Path:
        """adapter/ (PEFT), model/ (full weights) or merged/ (adapter merged into its base)."""
        if kind not in ARTEFACTS:
            raise ValueError(f"unknown artefact {kind!r}")
        return self.path / kind

    def eval_dir(self, suite: str) -> Path:
        return self.path / "eval" / suite

    def weights(self) -> tuple[str, Path] | None:
        """The artefact to load, full weights first: ('merged'|'model', folder) or ('adapter', folder); None without one."""
        for kind in ARTEFACTS:
            folder = self.artefact(kind)
            if (folder / ("adapter_config.json" if kind == "adapter" else "config.json")).exists():
                return kind, folder
        return None

    def holds_run(self) -> bool:
        return self.config.exists() or self.summary_path.exists()

    # --- claiming a directory for a new run ---
    @classmethod
    def claim(cls, path: Path | str, named_by_user: bool) -> RunDir:
        """A directory for a new run, locked for its life. A directory that is locked by a live run or holds
        another run is refused (`named_by_user`) or replaced by the next free `<name>-2`, `<name>-3`, ..."""
        path = Path(path)
        for attempt in range(1, 1000):
            candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
            run = cls(candidate, rank=0)
            why = run._try_lock()
            if why is None:
                if candidate != path:
                    log.info("%s is taken (%s); this run uses %s", path, path_reason(path), candidate)
                    redirect_log_files(path, candidate)
                return run
            if named_by_user:
                hint = f" (or resume=true run={candidate} to continue it)" if why.endswith(("interrupted run", "crashed run")) else ""
                raise ConfigError(f"{candidate} {why}: choose another hydra.run.dir{hint}.")
        raise ConfigError(f"no free run directory next to {path}.")

    def _try_lock(self) -> str | None:
        """Take the run's lock; None on success, else why the directory cannot be used."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {self.path} ({e.strerror}): set paths.output_dir "
                              "(or hydra.run.dir) to a folder you can write.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return "is in use by another run" + owner_text(read_json(self.owner_path))
        if self.holds_run():
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            status = self.status()
            return f"already holds a {status} run"
        self._lock_fd = fd
        return None

    def take_over(self) -> None:
        """resume=true: lock an existing run's directory again (refused while its owner lives)."""
        try:
            fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"run {self.path} is still running{owner_text(read_json(self.owner_path))}; "
                              "wait for it or stop it before resuming.") from None
        self._lock_fd = fd

    def start(self, cfg: DictConfig, overrides: list[str] | None, distributed: dict | None = None) -> None:
        """Write what a new (or resumed) run starts with, record the owner and start the heartbeat."""
        self._write_owner()
        if overrides is not None:
            self.overrides.write_text("".join(f"{o}\n" for o in overrides))
            write_json(self.env, env_info(Path(cfg.paths.root), distributed))
        self._heartbeat = threading.Thread(target=self._beat, name="medgpt-heartbeat", daemon=True)
        self._heartbeat.start()

    def write_config(self, cfg: DictConfig) -> None:
        self.config.write_text(OmegaConf.to_yaml(cfg, resolve=True))

    def release(self) -> None:
        self._stop.set()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    def _write_owner(self) -> None:
        now = time.time()
        write_json(self.owner_path, {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            owner = read_json(self.owner_path)
            with contextlib.suppress(OSError):
                write_json(self.owner_path, {**owner, "heartbeat": time.time()})

    # --- summary.json ---
    @contextlib.contextmanager
    def update_lock(self):
        """A short exclusive lock for read-modify-write of summary.json and for adding folders to a finished run."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".update.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read_summary(self) -> RunSummary:
        """summary.json as written (status `crashed` when it says running and its owner is gone)."""
        summary = RunSummary.from_dict(read_json(self.summary_path))
        if summary.status == "running" and self.owner_gone():
            summary.status = "crashed"
        return summary

    def status(self) -> str:
        return self.read_summary().status if self.summary_path.exists() else "none"

    def update_summary(self, values: dict | None = None, status: str | None = None) -> RunSummary:
        """Atomic read-modify-write of summary.json (main process only; other ranks get the current summary back)."""
        with self.update_lock():
            summary = RunSummary.from_dict(read_json(self.summary_path))
            summary.update(values or {})
            if status:
                summary.status = status
            summary.version = SUMMARY_VERSION
            if self.is_main:
                write_json(self.summary_path, summary.to_dict())
            return summary

    def begin_summary(self, values: dict | None = None) -> None:
        """A new run's summary.json: status running and nothing else from any earlier attempt."""
        if self.is_main:
            with self.update_lock():
                write_json(self.summary_path, RunSummary(status="running").update(values or {}).to_dict())

    def finish(self, status: str, values: dict | None = None, error: str | None = None) -> RunSummary:
        """The final status (completed | failed | interrupted) with the stage's summary."""
        values = dict(values or {})
        if error:
            values["error"] = error
        return self.update_summary(values, status=status)

    def owner_gone(self) -> bool:
        owner = read_json(self.owner_path)
        if not owner:
            return False  # written before liveness was recorded: cannot tell
        if owner.get("host") == socket.gethostname():
            return not _lock_held(self.path / ".lock")
        return time.time() - float(owner.get("heartbeat", 0)) > STALE_AFTER_S

    # --- facts saved once by training, read back by merge, serving, resume and init_from ---
    def base_model_path(self) -> str | None:
        """The folder the adapter applies to: summary.json, else the adapter's own config (older runs)."""
        recorded = self.read_summary().base_model_path
        if recorded and Path(recorded).exists():
            return recorded
        adapter_config = read_json(self.artefact("adapter") / "adapter_config.json")
        return adapter_config.get("base_model_name_or_path") or recorded


def _lock_held(lock_path: Path) -> bool:
    """Whether some process holds `lock_path` (a probe: takes and drops the lock at once)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def owner_text(owner: dict) -> str:
    return f" (pid {owner['pid']} on {owner.get('host', '?')})" if owner.get("pid") else ""


def path_reason(path: Path) -> str:
    run = RunDir(path)
    return f"a {run.status()} run" if run.holds_run() else "another run is starting in it"


def redirect_log_files(old: Path, new: Path) -> None:
    """Point this process' log files (Hydra's train.log) from a taken directory to the one the run got."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == old.resolve():
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                    handler.stream = None  # reopened lazily at the new path
                handler.baseFilename = str(new.resolve() / Path(handler.baseFilename).name)
            finally:
                handler.release()


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, key: str) -> None:
    """One sentence (ConfigError) when `path` cannot be created or written, before anything tries."""
    base = nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {base} is a file, not a folder.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be written ({base} is read-only for this user): choose a writable folder.")


class RunDirCheck(Callback):
    """Hydra callback (conf/config.yaml): an unwritable run or sweep directory is one sentence and exit 1, not
    Hydra's traceback from creating it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # the default directory reads ${hydra:runtime.cwd}; Hydra sets it later
        try:
            check_writable(Path(OmegaConf.select(config, key)), key)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)



def read_summary(run_dir: Path) -> dict:
    """summary.json of `run_dir` as a plain dict (status `crashed` for a dead owner); {} without one."""
    run = RunDir(run_dir)
    return run.read_summary().to_dict() if run.summary_path.exists() else {}


def resolve_run(run: str | None, output_dir: Path, status: str | tuple[str, ...] = "completed") -> Path:
    """`run=latest` -> the newest run with `status` (completed) under outputs/; `run=<path>` -> that directory."""
    if not run:
        raise ConfigError("this mode reads a finished run: pass run=<run directory> or run=latest.")
    if not isinstance(run, str | Path):
        raise ConfigError(f"run={list(run)} names several runs; this mode reads one (a list is for mode=compare).")
    wanted = (status,) if isinstance(status, str) else status
    if run == "latest":
        runs = [p.parent for p in Path(output_dir).glob("**/summary.json") if RunDir(p.parent).status() in wanted]
        if not runs:
            raise ConfigError(f"run=latest: no {' or '.join(wanted)} run under {output_dir}; train one first (python launch.py).")
        return max(runs, key=lambda p: (p / "summary.json").stat().st_mtime)
    path = Path(run).expanduser()
    if not RunDir(path).config.exists():
        raise ConfigError(f"run={run} is not a run directory (it has no config.yaml).")
    return path


def trained_run(run_dir: Path) -> Path:
    """The run that holds the weights: a pipeline's root directory stands for its last stage (`final_run`)."""
    run = RunDir(run_dir)
    final = run.read_summary().get("final_run")
    if final and run.weights() is None and RunDir(final).config.exists():
        return Path(final)
    return Path(run_dir)
