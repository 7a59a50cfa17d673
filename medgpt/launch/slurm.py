"""Multi-node training under SLURM: an sbatch script that starts ONE torchrun per node with srun.

`launcher=torchrun launcher.nnodes=2 launcher.nproc_per_node=8 launcher.dry_run=true` writes the run directory
(with its config.yaml) and prints, among the per-node commands, this script; save it and `sbatch` it. Inside
the job, srun starts one task per node; each runs

    python -m torch.distributed.run --nnodes M --nproc_per_node N --node_rank $SLURM_NODEID \
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT --rdzv_id $SLURM_JOB_ID \
        --max_restarts 0 -m medgpt.launch.worker <run_dir>

with MASTER_ADDR the job's first node (`scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1`) and
MASTER_PORT launcher.master_port (or launcher.rdzv_endpoint when it is set). The run directory must be on a file
system all nodes share. `--signal=TERM@<s>` asks SLURM for SIGTERM that long before the time limit, so the ranks
save a checkpoint (SIGUSR1, which the single-process `hydra/launcher=slurm` preset uses, would kill torchrun,
which does not handle it); continue with `python launch.py run=<run_dir> resume=true`.

This is tested as text only (tests/test_launch.py): there is no SLURM where the tests run, so the script has not
been submitted to a real cluster by the test suite.

Note: scancel and `--signal` deliver the signal to every process of the job step (the ranks as well as torchrun,
which forwards it again), so a rank may see the signal twice.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from medgpt.launch.torchrun import (
    BACKEND_ENV,
    SHUTDOWN_TIMEOUT_ENV,
    SHUTDOWN_TIMEOUT_S,
    WORKER_MODULE,
    _get,
    _host_port,
    _settings,
    rdzv_id,
    resolve_backend,
)

DEFAULT_TIME = "04:00:00"  # the hydra/launcher=slurm preset's timeout_min: 240
SIGNAL_DELAY_S = 120  # the preset's signal_delay_s


def _time(value: int | str) -> str:
    """SLURM's --time from minutes (int) or as given ("HH:MM:SS", "D-HH:MM:SS")."""
    if isinstance(value, int):
        return f"{value // 60:02d}:{value % 60:02d}:00"
    return str(value)


def srun_task(launcher: Any, run_dir: str | Path, python: str = sys.executable, module: str = WORKER_MODULE) -> str:
    """The command each srun task runs on its node (SLURM variables expand there)."""
    nproc, nnodes, *_ = _settings(launcher)
    literal = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc)]
    rendezvous = ('--node_rank "$SLURM_NODEID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" '
                  '--rdzv_id "$SLURM_JOB_ID"')
    tail = ["--max_restarts", "0", "-m", module, str(Path(run_dir).resolve())]
    return f"exec {shlex.join(literal)} {rendezvous} {shlex.join(tail)}"


def sbatch_script(launcher: Any, run_dir: str | Path, partition: str | None = None, gpus_per_node: int | None = None,
                  time: int | str = DEFAULT_TIME, account: str | None = None, cpus_per_task: int | None = None,
                  mem_gb: int | None = None, setup: list[str] | tuple[str, ...] = (), python: str = sys.executable,
                  module: str = WORKER_MODULE, signal_delay_s: int = SIGNAL_DELAY_S) -> str:
    """The sbatch script for `launcher` (launcher.nnodes nodes x nproc_per_node ranks) training `run_dir`.

    gpus_per_node defaults to launcher.nproc_per_node (one GPU per rank); 0 makes a CPU job (gloo). `setup`: shell
    lines run first on the batch node (e.g. "source .venv/bin/activate"); srun passes the environment on.
    Not runnable here (no SLURM): the tests check its text.
    """
    nproc, nnodes, _, addr, port = _settings(launcher)
    gpus = nproc if gpus_per_node is None else int(gpus_per_node)
    backend = resolve_backend(_get(launcher, "backend", "auto"), "cuda" if gpus else "cpu")
    run_dir = Path(run_dir).resolve()
    explicit = _get(launcher, "rdzv_endpoint")
    host, port = _host_port(explicit) if explicit else (None, port)
    master = shlex.quote(host) if host else '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
    directives = [f"--job-name=medgpt-{rdzv_id(run_dir)}"[:80], f"--nodes={nnodes}", "--ntasks-per-node=1"]
    directives += [f"--gpus-per-node={gpus}"] if gpus else []
    directives += [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []
    directives += [f"--mem={mem_gb}G"] if mem_gb else []
    directives += [f"--time={_time(time)}", f"--signal=TERM@{signal_delay_s}", f"--output={run_dir}/slurm-%j.out"]
    directives += [f"--partition={partition}"] if partition else []
    directives += [f"--account={account}"] if account else []
    lines = [
        "#!/bin/bash",
        f"# medgpt: {nnodes} node(s) x {nproc} rank(s), one torchrun per node started by srun, backend {backend}.",
        f"# Run directory (config.yaml already written; it must be on a file system all nodes share): {run_dir}",
        "# Submit with: sbatch <this file>. Stopped by scancel or near the time limit, the ranks save a checkpoint;",
        f"# continue with: python launch.py run={run_dir} resume=true",
        *(f"#SBATCH {d}" for d in directives),
        "set -euo pipefail",
        *setup,
        f"MASTER_ADDR={master}  # the rendezvous host: the job's first node",
        f"MASTER_PORT={port}",
        f"export MASTER_ADDR MASTER_PORT {BACKEND_ENV}={backend} {SHUTDOWN_TIMEOUT_ENV}={SHUTDOWN_TIMEOUT_S}",
        f"srun --nodes={nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(srun_task(launcher, run_dir, python, module))}",
    ]
    return "\n".join(lines) + "\n"
