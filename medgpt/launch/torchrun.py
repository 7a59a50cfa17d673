"""launcher=torchrun: start the training ranks with torch's elastic launcher (`python -m torch.distributed.run`).

The parent (medgpt.run) composes and validates the config, creates the ONE run directory, writes
`<run_dir>/config.yaml`, then calls `launch()`. That runs, in its own process group,

    python -m torch.distributed.run --nnodes 1 --nproc_per_node N --master_addr A --master_port P \
        --max_restarts 0 -m medgpt.launch.worker <run_dir>

(multi-node: `--nnodes M --node_rank R --rdzv_backend c10d --rdzv_endpoint host:port --rdzv_id <id>`, one
such command per node; `launcher.master_port=0` on one node means any free port: `--standalone`).
Every rank reads `<run_dir>/config.yaml` (medgpt.launch.worker); no rank composes or creates a directory.

Environment of the workers (besides torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_*):

    MEDGPT_DIST_BACKEND   the resolved process-group backend: nccl (CUDA) or gloo (CPU); launcher.backend=auto
                          picks nccl when the node has CUDA, gloo otherwise. Pass it to
                          init_process_group / TrainingArguments(ddp_backend=...).
    MEDGPT_LAUNCH_ID      one id per launch; the parent finds every process of the launch by it and stops
                          whatever outlives torchrun.
    OMP_NUM_THREADS       on CPU, when not set: the cores divided among the ranks (torchrun would set 1).
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT  (for torchrun) seconds the ranks get after a signal before SIGKILL.

Signals: SIGINT / SIGTERM to the parent (Ctrl-C, scancel) are forwarded once to torchrun, which sends the same
signal to every rank once: the training ranks finish the step, save a checkpoint and exit (the run is
`interrupted`). SIGUSR1 (SLURM's warning before a time limit) is forwarded as SIGTERM. A second signal goes to
the ranks directly as well: they stop at once. When torchrun has exited, every process of the launch that is
still alive gets SIGTERM, then SIGKILL after a grace period: nothing is left behind.

Errors: a rank that fails writes `<run_dir>/.rank<N>.error` (JSON: rank, type, message, user_error, time,
traceback; `record_worker_error`); the outcome names the earliest one in one sentence. Without such a file (a rank
killed by a signal) the sentence comes from torchrun's own failure summary. Rank 0 leaves its result (the summary,
or where an interrupt stopped it) in `<run_dir>/.rank0.result.json`, which `launch()` reads into the outcome and
removes. Stale `.rank*` files of an earlier launch in the same directory (resume=true) are removed first.
"""

from __future__ import annotations

import codecs
import datetime
import errno
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.errors import ConfigError, MedgptError

log = logging.getLogger("medgpt.launch")

BACKEND_ENV = "MEDGPT_DIST_BACKEND"
LAUNCH_ID_ENV = "MEDGPT_LAUNCH_ID"
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
WORKER_MODULE = "medgpt.launch.worker"
BACKENDS = ("auto", "nccl", "gloo")
RESULT_FILE = ".rank0.result.json"
INTERRUPT_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
SHUTDOWN_TIMEOUT_S = 120  # a rank's time to save a checkpoint after a signal, before torchrun kills it
KILL_GRACE_S = 10.0  # after torchrun exits: SIGTERM to what is left, SIGKILL after this


def error_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / f".rank{int(rank)}.error"


# ---------------------------------------------------------------- settings and checks


def _get(launcher: Any, key: str, default: Any = None) -> Any:
    value = getattr(launcher, key, default)
    return default if value is None else value


def _settings(launcher: Any) -> tuple[int, int, int, str, int]:
    """nproc_per_node, nnodes, node_rank, master_addr, master_port, checked for what can be checked without a machine."""
    try:
        nproc, nnodes, node_rank = (int(_get(launcher, k, d)) for k, d in (("nproc_per_node", 1), ("nnodes", 1), ("node_rank", 0)))
        port = int(_get(launcher, "master_port", 29500))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"launcher.nproc_per_node, nnodes, node_rank and master_port must be whole numbers ({e}).") from None
    if nproc < 1:
        raise ConfigError(f"launcher.nproc_per_node={nproc}: use 1 or more processes per node.")
    if nnodes < 1:
        raise ConfigError(f"launcher.nnodes={nnodes}: use 1 or more nodes.")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"launcher.node_rank={node_rank} is outside 0..{nnodes - 1} for launcher.nnodes={nnodes}.")
    if not 0 <= port <= 65535 or (port == 0 and nnodes > 1 and not _get(launcher, "rdzv_endpoint")):
        raise ConfigError(f"launcher.master_port={port}: use a port in 1..65535 (0, any free port, only works on one node).")
    return nproc, nnodes, node_rank, str(_get(launcher, "master_addr", "127.0.0.1")), port


def _host_port(endpoint: str) -> tuple[str, int]:
    host, sep, port = str(endpoint).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"launcher.rdzv_endpoint={endpoint}: use host:port, e.g. node001:29500.")
    return host.strip("[]"), int(port)


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def rdzv_endpoint(launcher: Any) -> str:
    """The c10d rendezvous endpoint host:port (launcher.rdzv_endpoint, default master_addr:master_port)."""
    explicit = _get(launcher, "rdzv_endpoint")
    if explicit:
        return _endpoint(*_host_port(explicit))
    _, _, _, addr, port = _settings(launcher)
    return _endpoint(addr, port)


def rdzv_id(run_dir: str | Path) -> str:
    """A rendezvous id every node derives alike from the run directory: `<date>_<time>-<method>-<model>`."""
    path = Path(run_dir)
    name = f"{path.parent.name}_{path.name}" if path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "medgpt"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _uses_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and _cuda_available())


def resolve_backend(backend: str, device: str) -> str:
    """launcher.backend for hardware.device: auto -> nccl on CUDA, gloo otherwise; nccl without CUDA is an error."""
    backend = str(backend or "auto").lower()
    if backend not in BACKENDS:
        raise ConfigError(f"launcher.backend={backend}: use one of {', '.join(BACKENDS)}.")
    cuda = _uses_cuda(str(device))
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ConfigError(f"launcher.backend=nccl needs CUDA GPUs and hardware.device={device} has none here: use launcher.backend=gloo (or auto).")
    return backend


def check_devices(nproc_per_node: int, device: str) -> None:
    """One sentence (ConfigError) when this node cannot run nproc_per_node ranks; on CPU only a warning above the core count."""
    nproc, device = int(nproc_per_node), str(device)
    if nproc < 1:
        raise ConfigError(f"launcher.nproc_per_node={nproc}: use 1 or more processes per node.")
    if device == "mps" and nproc > 1:
        raise ConfigError(f"launcher.nproc_per_node={nproc} on hardware.device=mps: an Apple GPU runs one process; "
                          "use hardware.device=cpu for several.")
    if _uses_cuda(device):
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > visible:
            seen = f"{visible} GPU{'s' if visible != 1 else ''}" if visible else "no GPU"
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={mask})" if mask is not None else ""
            fix = f"use launcher.nproc_per_node={visible} or fewer" if visible else "use hardware.device=cpu"
            raise ConfigError(f"launcher.nproc_per_node={nproc} needs {nproc} GPUs but this node sees {seen}{where}: {fix}.")
        return
    cores = os.cpu_count() or 1
    if nproc > cores:
        log.warning("launcher.nproc_per_node=%d is more than the %d CPU cores of this machine: the ranks will compete for them.", nproc, cores)


def _is_local_address(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_port_free(addr: str, port: int, setting: str = "launcher.master_port") -> None:
    """One sentence (ConfigError) when `port` is taken on this machine; 0 (any free port) is always fine.

    Binds with SO_REUSEADDR (as torch's TCPStore does), so a port whose last connection is in TIME_WAIT is not
    reported busy, while one that another process listens on (on any address) is.
    """
    port = int(port)
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{setting}={port} is already in use on {addr} (another run or torchrun listens on it): "
                                  f"stop it or pick a free port, e.g. launcher.master_port={_free_port()}.") from None
            raise ConfigError(f"{setting}={port} cannot be used on {addr} ({e.strerror}): pick a port in 1024..65535.") from None


def preflight(launcher: Any, device: str = "auto") -> str:
    """The checks `launch()` makes before it starts anything; returns the resolved backend."""
    nproc, nnodes, node_rank, addr, port = _settings(launcher)
    backend = resolve_backend(_get(launcher, "backend", "auto"), device)
    check_devices(nproc, device)
    if node_rank == 0:  # the node that hosts the rendezvous
        if nnodes == 1 and not _get(launcher, "rdzv_endpoint"):
            check_port_free(addr, port)
        else:
            host, rport = _host_port(rdzv_endpoint(launcher))
            if _is_local_address(host):  # otherwise another machine hosts it
                check_port_free(host, rport, "launcher.rdzv_endpoint port" if _get(launcher, "rdzv_endpoint") else "launcher.master_port")
    return backend


# ---------------------------------------------------------------- commands


def torchrun_command(launcher: Any, run_dir: str | Path, python: str = sys.executable, module: str = WORKER_MODULE,
                     node_rank: int | None = None) -> list[str]:
    """The torchrun argv for one node (`node_rank`, default launcher.node_rank); the workers get `<run_dir>`."""
    nproc, nnodes, rank, addr, port = _settings(launcher)
    rank = rank if node_rank is None else int(node_rank)
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
    if nnodes == 1 and not _get(launcher, "rdzv_endpoint"):
        cmd += ["--standalone"] if port == 0 else ["--master_addr", addr, "--master_port", str(port)]
    else:
        cmd += ["--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv_endpoint(launcher),
                "--rdzv_id", rdzv_id(run_dir)]
    return cmd + ["--max_restarts", "0", "-m", module, str(Path(run_dir).resolve())]


def worker_env(launcher: Any, device: str = "auto", base: dict | None = None, backend: str | None = None) -> dict[str, str]:
    """The variables a launch adds to the environment (see the module docstring), given the `base` environment."""
    base = os.environ if base is None else base
    backend = backend or resolve_backend(_get(launcher, "backend", "auto"), device)
    env = {BACKEND_ENV: backend}
    if backend == "gloo" and "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _settings(launcher)[0]))
    if SHUTDOWN_TIMEOUT_ENV not in base:
        env[SHUTDOWN_TIMEOUT_ENV] = str(SHUTDOWN_TIMEOUT_S)
    return env


def node_commands(launcher: Any, run_dir: str | Path, device: str = "auto", python: str = sys.executable,
                  module: str = WORKER_MODULE) -> list[str]:
    """One shell line per node (node 0 first): the environment, then the torchrun command."""
    nnodes = _settings(launcher)[1]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in worker_env(launcher, device).items())
    return [f"{env} {shlex.join(torchrun_command(launcher, run_dir, python, module, node_rank=r))}" for r in range(nnodes)]


def dry_run_text(launcher: Any, run_dir: str | Path, device: str = "auto", python: str = sys.executable,
                 module: str = WORKER_MODULE) -> str:
    """What launcher.dry_run=true prints instead of running: the command of every node (and, multi-node, an sbatch script)."""
    nproc, nnodes, *_ = _settings(launcher)
    backend = resolve_backend(_get(launcher, "backend", "auto"), device)
    lines = [f"launcher=torchrun dry run: {nnodes} node{'s' if nnodes > 1 else ''} x {nproc} process{'es' if nproc > 1 else ''}, "
             f"backend {backend}; run directory {Path(run_dir).resolve()} (config.yaml is written; nothing was started)"]
    commands = node_commands(launcher, run_dir, device, python, module)
    if nnodes == 1:
        lines += ["run:", f"  {commands[0]}"]
    else:
        lines += ["run on each node (the run directory must be on a file system all nodes share; node 0 hosts the rendezvous):"]
        lines += [f"  node {r}: {c}" for r, c in enumerate(commands)]
        from medgpt.launch.slurm import sbatch_script

        lines += ["", "or under SLURM, save this script and submit it with sbatch:", "",
                  sbatch_script(launcher, run_dir, python=python, module=module)]
    return "\n".join(lines)


# ---------------------------------------------------------------- worker error and result files


def _one_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def record_worker_error(run_dir: str | Path, rank: int, exc: BaseException) -> Path:
    """Called by a worker whose stage raised: `<run_dir>/.rank<rank>.error` with the one-sentence error and when."""
    path = error_file(run_dir, rank)
    _write_json(path, {"rank": int(rank), "type": type(exc).__name__, "message": _one_line(str(exc)),
                       "user_error": isinstance(exc, MedgptError), "time": time.time(),
                       "traceback": "".join(traceback.format_exception(exc))[-8000:]})
    return path


def write_worker_result(run_dir: str | Path, result: dict) -> None:
    """Rank 0's result for the parent: {"status": "completed", "summary": {...}} or {"status": "interrupted", ...}."""
    _write_json(Path(run_dir) / RESULT_FILE, result)


def read_worker_errors(run_dir: str | Path) -> list[dict]:
    """The error files of the ranks, earliest first."""
    errors = []
    for path in Path(run_dir).glob(".rank*.error"):
        try:
            data = json.loads(path.read_text())
            rank = int(data.get("rank", re.sub(r"\D", "", path.name) or -1))
            errors.append({**data, "rank": rank, "time": float(data.get("time", path.stat().st_mtime))})
        except (OSError, ValueError, TypeError):
            continue
    return sorted(errors, key=lambda e: (e["time"], e["rank"]))


def error_sentence(error: dict) -> str:
    message = error.get("message") or ""
    if error.get("user_error"):
        return f"rank {error['rank']}: {message}"
    return f"rank {error['rank']} failed with {error.get('type', 'an error')}" + (f": {message}" if message else "")


def _clear_worker_files(run_dir: Path) -> None:
    for path in [*run_dir.glob(".rank*.error"), run_dir / RESULT_FILE]:
        path.unlink(missing_ok=True)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_FAILURE = re.compile(r"\[\d+\]:\s*\n\s*time\s*:\s*(?P<time>\S+)\s*\n.*?rank\s*:\s*(?P<rank>-?\d+).*?exitcode\s*:\s*(?P<code>-?\d+)"
                      r"(?:.*?traceback\s*:\s*(?P<tb>[^\n]*))?", re.S)


def torchrun_failures(stderr_tail: str) -> list[dict]:
    """The failed ranks in torchrun's failure summary (rank, exitcode, time, root_cause), root cause first; [] if none."""
    marker = stderr_tail.rfind("Root Cause (first observed failure):")
    if marker < 0:
        return []
    begin = stderr_tail.rfind("Failures:", 0, marker)
    failures = {}
    for part, root in ((stderr_tail[marker:], True), (stderr_tail[begin if begin >= 0 else marker:marker], False)):
        for m in _FAILURE.finditer(part):
            try:
                when = datetime.datetime.strptime(m["time"], "%Y-%m-%d_%H:%M:%S").timestamp()
            except ValueError:
                when = None
            failures.setdefault(int(m["rank"]), {"rank": int(m["rank"]), "exitcode": int(m["code"]), "time": when,
                                                 "traceback": (m["tb"] or "").strip(), "root_cause": root})
    return sorted(failures.values(), key=lambda f: not f["root_cause"])


def first_failure(errors: list[dict], failures: list[dict]) -> tuple[int, str] | None:
    """The first failing rank and its sentence, from the ranks' error files (earliest first) and torchrun's summary.

    A rank that died without writing an error file (killed by a signal other than the SIGTERM/SIGINT that stops the
    others, or exited non-zero on its own) within a second of the earliest error file is the cause: the errors the
    other ranks then record (a collective whose peer is gone) are consequences. torchrun's times have whole seconds.
    """
    recorded = {e["rank"] for e in errors}
    silent = [f for f in failures if f["rank"] not in recorded and f["exitcode"] != 0
              and -f["exitcode"] not in (signal.SIGTERM, signal.SIGINT) and f["exitcode"] - 128 not in INTERRUPT_SIGNALS]
    if errors:
        earliest = errors[0]["time"]
        silent = [f for f in silent if f["time"] is not None and f["time"] <= earliest + 1]
        if not silent:
            return errors[0]["rank"], error_sentence(errors[0])
    candidates = silent or failures
    if not candidates:
        return None
    first = min(candidates, key=lambda f: (f["time"] or 0, not f["root_cause"]))
    return first["rank"], failure_sentence(first)


def failure_sentence(failure: dict) -> str:
    rank, code = failure["rank"], failure["exitcode"]
    if code < 0:
        return f"rank {rank} was killed by {_signal_name(-code)} (exit {code})"
    if code > 128 and code - 128 in set(INTERRUPT_SIGNALS) | {signal.SIGKILL}:
        return f"rank {rank} stopped on {_signal_name(code - 128)} (exit {code})"
    return f"rank {rank} exited with code {code}"


# ---------------------------------------------------------------- the launch


@dataclass
class LaunchOutcome:
    """How a launch ended. `returncode` is what the parent should exit with (128+signal when interrupted)."""

    returncode: int
    interrupted: bool = False
    signum: int | None = None  # the signal that interrupted the run
    error: str | None = None  # the first failing rank's error, one sentence
    failed_rank: int | None = None
    summary: dict | None = None  # rank 0's summary (medgpt.run.train_worker's return value)
    interrupt: dict | None = None  # rank 0's RunInterrupted: signum, step, checkpoint
    dry_run: bool = False
    timed_out: bool = False
    launch_id: str | None = None
    pid: int | None = None  # torchrun's process id
    leftovers: int = 0  # processes of the launch that outlived torchrun and were stopped

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.interrupted and self.error is None


class _Launch:
    """One running torchrun: relays its output, forwards signals, tracks its processes, cleans up after it."""

    def __init__(self, proc: subprocess.Popen, launch_id: str, kill_grace_s: float):
        import psutil

        self.psutil, self.proc, self.launch_id, self.kill_grace_s = psutil, proc, launch_id, kill_grace_s
        self.signals: list[int] = []
        self.first_signal_at: float | None = None
        self.tracked: dict[int, Any] = {}
        self.stderr_tail = bytearray()
        self.tail_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._relay, args=(proc.stdout, sys.stdout, False), daemon=True),
                        threading.Thread(target=self._relay, args=(proc.stderr, sys.stderr, True), daemon=True)]
        for t in self.threads:
            t.start()

    def _relay(self, src, dst, keep_tail: bool) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out = getattr(dst, "buffer", None)
        fd = src.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            if keep_tail:
                with self.tail_lock:
                    self.stderr_tail += chunk
                    del self.stderr_tail[:-65536]
            try:
                if out is not None:
                    dst.flush()
                    out.write(chunk)
                    out.flush()
                else:
                    dst.write(decoder.decode(chunk))
                    dst.flush()
            except (OSError, ValueError):
                pass  # our own stream is closed: keep draining the pipe

    def stderr_text(self) -> str:
        with self.tail_lock:
            return self.stderr_tail.decode("utf-8", "replace")

    def on_signal(self, signum, frame) -> None:
        if self.proc.returncode is not None:
            return  # torchrun has exited and been reaped: launch() is about to clean up
        self.signals.append(signum)
        forward = signal.SIGTERM if signum not in (signal.SIGINT, signal.SIGTERM) else signum
        if len(self.signals) == 1:
            self.first_signal_at = time.time()
            print(f"\n{_signal_name(signum)} received: every rank finishes its step, saves a checkpoint and stops "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            _killpg(self.proc.pid, forward)
        else:
            _killpg(self.proc.pid, forward)
            self.track()
            for p in self.tracked.values():
                _kill(p, forward)

    def track(self) -> None:
        try:
            for child in self.psutil.Process(self.proc.pid).children(recursive=True):
                self.tracked.setdefault(child.pid, child)
        except self.psutil.Error:
            pass

    def _alive(self, p) -> bool:
        try:
            return p.is_running() and p.status() != self.psutil.STATUS_ZOMBIE
        except self.psutil.Error:
            return False

    def _marked(self) -> list:
        found = []
        for p in self.psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get(LAUNCH_ID_ENV) == self.launch_id:
                    found.append(p)
            except (self.psutil.Error, OSError):
                continue
        return found

    def cleanup(self) -> int:
        """After torchrun exited: stop every process of the launch still alive (SIGTERM, then SIGKILL); how many there were."""
        left = {p.pid: p for p in self.tracked.values() if self._alive(p)}
        for p in self._marked():
            left.setdefault(p.pid, p)
        left = {pid: p for pid, p in left.items() if self._alive(p)}
        if left:
            log.warning("%d process(es) of the launch outlived torchrun (pids %s): stopping them",
                        len(left), ", ".join(map(str, sorted(left))))
            for p in left.values():
                _kill(p, signal.SIGTERM)
            _, alive = self.psutil.wait_procs(list(left.values()), timeout=self.kill_grace_s)
            for p in alive:
                _kill(p, signal.SIGKILL)
            self.psutil.wait_procs(alive, timeout=5)
        for t in self.threads:
            t.join(timeout=5)
        return len(left)


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(p, signum: int) -> None:
    try:
        p.send_signal(signum)
    except Exception:  # gone already (psutil.NoSuchProcess) or not ours
        pass


def launch(launcher: Any, run_dir: str | Path, env: dict | None = None, module: str = WORKER_MODULE, device: str = "auto", *,
           python: str = sys.executable, timeout: float | None = None, kill_grace_s: float = KILL_GRACE_S) -> LaunchOutcome:
    """Run this node's torchrun for `run_dir` (whose config.yaml the parent wrote) and wait; never leaves a process behind.

    launcher.dry_run=true prints `dry_run_text()` and starts nothing. ConfigError (one sentence) before anything
    starts: a busy master port (node 0), more ranks than GPUs, an unknown backend. `env` is added to the
    environment of torchrun and the ranks. `timeout` (seconds, optional) is a watchdog: the launch is stopped
    (SIGTERM, then SIGKILL) and the outcome says it timed out. Signal forwarding needs the main thread.
    """
    run_dir = Path(run_dir).resolve()
    if _get(launcher, "dry_run", False):
        print(dry_run_text(launcher, run_dir, device, python, module), flush=True)
        return LaunchOutcome(0, dry_run=True)
    backend = preflight(launcher, device)
    _clear_worker_files(run_dir)
    launch_id = uuid.uuid4().hex
    cmd = torchrun_command(launcher, run_dir, python, module)
    full_env = {**os.environ, **worker_env(launcher, device, backend=backend), **(env or {}), LAUNCH_ID_ENV: launch_id}
    nproc, nnodes, node_rank, *_ = _settings(launcher)
    log.info("launching %d rank(s) on node %d of %d (backend %s): %s", nproc, node_rank, nnodes, backend, shlex.join(cmd))
    if nnodes > 1 and node_rank == 0:
        others = node_commands(launcher, run_dir, device, python, module)[1:]
        log.info("start the other nodes with:\n%s", "\n".join(f"  node {r}: {c}" for r, c in enumerate(others, 1)))

    in_main = threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    run = _Launch(proc, launch_id, kill_grace_s)
    previous = {s: signal.signal(s, run.on_signal) for s in INTERRUPT_SIGNALS} if in_main else {}
    timed_out, deadline, hard_deadline = False, (time.monotonic() + timeout) if timeout else None, None
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            run.track()
            now = time.monotonic()
            if deadline is not None and now > deadline and not timed_out:
                timed_out = True
                log.error("the launch ran past its %s s timeout: stopping every rank", timeout)
                _killpg(proc.pid, signal.SIGTERM)
                hard_deadline = now + kill_grace_s
            if hard_deadline is not None and now > hard_deadline:
                _killpg(proc.pid, signal.SIGKILL)
                for p in run.tracked.values():
                    _kill(p, signal.SIGKILL)
                hard_deadline = None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception (KeyboardInterrupt outside the main thread, ...) left torchrun running
            run.track()
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=kill_grace_s)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        leftovers = run.cleanup()
    outcome = _outcome(run_dir, proc.returncode, run, timed_out, timeout)
    outcome.launch_id, outcome.pid, outcome.leftovers = launch_id, proc.pid, leftovers
    return outcome


def _outcome(run_dir: Path, rc: int, run: _Launch, timed_out: bool, timeout: float | None) -> LaunchOutcome:
    """completed, interrupted (a signal to us, or to every rank) or failed (the first failing rank, one sentence)."""
    killed = -rc if rc < 0 else None  # torchrun itself killed by a signal
    rc = 128 - rc if rc < 0 else rc
    result = _read_result(run_dir)
    summary = result.get("summary") if result.get("status") == "completed" else None
    interrupt = {k: result.get(k) for k in ("signum", "step", "checkpoint")} if result.get("status") == "interrupted" else None
    done = {"summary": summary, "interrupt": interrupt}
    errors = read_worker_errors(run_dir)
    failures = torchrun_failures(run.stderr_text()) if rc != 0 else []
    if timed_out:
        return LaunchOutcome(rc or 1, error=f"the launch ran past its {timeout} s timeout and was stopped", timed_out=True, **done)
    signum = run.signals[0] if run.signals else None
    if signum is not None:  # what fails after our signal is its consequence (broken collectives, ...)
        errors = [e for e in errors if e["time"] < run.first_signal_at]
        failures = [f for f in failures if f["time"] is not None and f["time"] < int(run.first_signal_at) - 1]
    real = [f for f in failures if f["exitcode"] - 128 not in INTERRUPT_SIGNALS and -f["exitcode"] not in INTERRUPT_SIGNALS]
    if signum is None and not errors:  # the ranks were signalled directly (scancel and SLURM's --signal reach every process)
        if interrupt and interrupt.get("signum"):
            signum = int(interrupt["signum"])
        elif failures and not real:
            signum = failures[0]["exitcode"] - 128 if failures[0]["exitcode"] > 0 else -failures[0]["exitcode"]
    if signum is not None and not errors and not real and (rc != 0 or interrupt):
        return LaunchOutcome(128 + int(signum), interrupted=True, signum=int(signum), **done)
    if rc == 0 and not errors:
        return LaunchOutcome(0, **done)
    first = first_failure(errors, failures)
    if first:
        return LaunchOutcome(rc or 1, error=first[1], failed_rank=first[0], **done)
    if killed:
        return LaunchOutcome(rc, error=f"torchrun was killed by {_signal_name(killed)} (exit {-killed}); its ranks were stopped", **done)
    last = _one_line("\n".join(reversed(run.stderr_text().splitlines())))
    return LaunchOutcome(rc or 1, error=f"torchrun exited with code {rc}" + (f": {last}" if last else ""), **done)


def _read_result(run_dir: Path) -> dict:
    path = run_dir / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    path.unlink(missing_ok=True)
    return data if isinstance(data, dict) else {}
