"""Multi-process launch: `launcher=torchrun` starts the training workers with torch's elastic launcher.

Compose once: the parent (medgpt.run) validates the config, creates the ONE run directory and writes
`<run_dir>/config.yaml`; `launch()` then runs `python -m torch.distributed.run ... -m medgpt.launch.worker
<run_dir>` and every rank reads that file (no rank composes a config or creates a directory).

    torchrun.py   command building, pre-flight checks (port, devices), launch + signal forwarding + cleanup,
                  the worker error files and the outcome of a launch
    slurm.py      an sbatch script that starts one torchrun per node with srun (multi-node under SLURM)
    worker.py     the worker entry point: per-rank logging, config.yaml, medgpt.run.train_worker
    run.py        the parent's side for medgpt.run: launch_workers (outcome -> summary, RunInterrupted or
                  WorkerFailed) and distributed_info (world size, backend)

Importing this package imports no torch (the parent only needs torch when it launches).
"""

from medgpt.launch.torchrun import (
    BACKEND_ENV,
    LAUNCH_ID_ENV,
    LaunchOutcome,
    check_devices,
    check_port_free,
    dry_run_text,
    launch,
    node_commands,
    preflight,
    record_worker_error,
    resolve_backend,
    torchrun_command,
    worker_env,
)

__all__ = [
    "BACKEND_ENV",
    "LAUNCH_ID_ENV",
    "LaunchOutcome",
    "check_devices",
    "check_port_free",
    "dry_run_text",
    "launch",
    "node_commands",
    "preflight",
    "record_worker_error",
    "resolve_backend",
    "torchrun_command",
    "worker_env",
]
