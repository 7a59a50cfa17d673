"""`python tests/launch_helpers/run_launch.py <run_dir> <mode> <port> [kill_grace_s]`: launch() with 2 CPU ranks of dist_worker,
then print `OUTCOME <json>` and exit with the outcome's code (the SIGINT test signals this process, as Ctrl-C would)."""

import dataclasses
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from medgpt.launch import launch

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    run_dir, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    grace = float(sys.argv[4]) if len(sys.argv) > 4 else 10.0
    launcher = SimpleNamespace(name="torchrun", nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1",
                               master_port=port, rdzv_endpoint=None, backend="auto", dry_run=False)
    env = {"PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]), "MEDGPT_TEST_LAUNCH_MODE": mode}
    outcome = launch(launcher, run_dir, env=env, module="launch_helpers.dist_worker", device="cpu", timeout=120,
                     kill_grace_s=grace)
    print("OUTCOME " + json.dumps(dataclasses.asdict(outcome)), flush=True)
    sys.exit(outcome.returncode)
