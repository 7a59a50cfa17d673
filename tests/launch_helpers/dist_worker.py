"""A torchrun worker for the launch tests that trains nothing: `-m launch_helpers.dist_worker <run_dir>`.

It goes through the real entry point (medgpt.launch.worker.main) with its own target instead of
medgpt.run.train_worker. MEDGPT_TEST_LAUNCH_MODE picks what the ranks do:
    ok    init_process_group, all_reduce(rank + 1), write rank<N>.ok; rank 0 returns a summary
    fail  rank 1 raises ValueError after init (rank 0 waits in all_reduce until torchrun stops it)
    kill  rank 1 kills itself with SIGKILL (no error file: the parent falls back to torchrun's summary)
    wait  both ranks write rank<N>.ready and wait for SIGINT/SIGTERM, then raise RunInterrupted as training does
    stubborn  both ranks ignore SIGINT/SIGTERM, write rank<N>.ready and sleep (only SIGKILL stops them)
Every rank writes rank<N>.pid first.
"""

import os
import signal
import sys
import time
from pathlib import Path

from medgpt.errors import RunInterrupted
from medgpt.launch import worker

MODE_ENV = "MEDGPT_TEST_LAUNCH_MODE"


def train_worker(cfg, run_dir: Path):
    import torch
    import torch.distributed as dist

    rank, mode = int(os.environ["RANK"]), os.environ.get(MODE_ENV, "ok")
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    dist.init_process_group(worker.backend())
    if mode == "fail" and rank == 1:
        raise ValueError("rank 1 failed on purpose")
    if mode == "kill" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "stubborn":
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        (run_dir / f"rank{rank}.ready").write_text("")
        while True:
            time.sleep(1)
    if mode == "wait":
        received = []
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: received.append(signum))
        (run_dir / f"rank{rank}.ready").write_text("")
        while not received:
            time.sleep(0.05)
        (run_dir / f"rank{rank}.signal").write_text(signal.Signals(received[0]).name)
        raise RunInterrupted(received[0], 3, str(run_dir / "checkpoints" / "checkpoint-3"))
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    (run_dir / f"rank{rank}.ok").write_text(f"{total.item()} {os.environ['WORLD_SIZE']} {cfg.name} {worker.backend()}")
    return {"sum": total.item(), "world_size": int(os.environ["WORLD_SIZE"])} if rank == 0 else None


if __name__ == "__main__":
    sys.exit(worker.main(target=train_worker))
