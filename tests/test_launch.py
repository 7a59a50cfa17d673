"""launcher=torchrun (medgpt.launch): commands, dry run, sbatch script, pre-flight checks, and real 2-process launches on CPU.

The real launches run torchrun with tests/launch_helpers/dist_worker.py (gloo, an all_reduce, no training) through
the real worker entry point; they are bounded by launch(timeout=...) and check that no process is left behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from omegaconf import OmegaConf

from medgpt.errors import ConfigError, RunInterrupted
from medgpt.launch import (
    BACKEND_ENV,
    LAUNCH_ID_ENV,
    check_devices,
    check_port_free,
    dry_run_text,
    launch,
    preflight,
    record_worker_error,
    resolve_backend,
    torchrun_command,
    worker,
    worker_env,
)
from medgpt.launch import torchrun as tr
from medgpt.launch.slurm import sbatch_script

HELPERS = Path(__file__).resolve().parent / "launch_helpers"
TEST_MODULE = "launch_helpers.dist_worker"


def launcher(**kw) -> SimpleNamespace:
    base = dict(name="torchrun", nproc_per_node=2, nnodes=1, node_rank=0, master_addr="127.0.0.1", master_port=29500,
                rdzv_endpoint=None, backend="auto", dry_run=False)
    return SimpleNamespace(**(base | kw))


def run_dir_with_config(tmp_path: Path) -> Path:
    run_dir = tmp_path / "2025-01-02" / "10-11-12-sft-tiny"
    run_dir.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"name": "launch-test"}), run_dir / "config.yaml")
    return run_dir


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def one_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# ---------------------------------------------------------------- commands


def test_single_node_command(tmp_path):
    cmd = torchrun_command(launcher(master_port=29555), tmp_path / "run", python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert flag(cmd, "--nnodes") == "1" and flag(cmd, "--nproc_per_node") == "2"
    assert flag(cmd, "--master_addr") == "127.0.0.1" and flag(cmd, "--master_port") == "29555"
    assert flag(cmd, "--max_restarts") == "0" and "--rdzv_backend" not in cmd
    assert cmd[-3:] == ["-m", "medgpt.launch.worker", str((tmp_path / "run").resolve())]
    assert "--standalone" in torchrun_command(launcher(master_port=0), tmp_path / "run")  # 0: any free port


def test_multi_node_command_uses_c10d_rendezvous(tmp_path):
    run_dir = tmp_path / "2025-01-02" / "10-11-12-sft-tiny"
    cmd = torchrun_command(launcher(nnodes=2, node_rank=1, nproc_per_node=8, master_addr="node001", master_port=29600), run_dir,
                           module="my.worker")
    assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--nproc_per_node") == "8" and flag(cmd, "--node_rank") == "1"
    assert flag(cmd, "--rdzv_backend") == "c10d" and flag(cmd, "--rdzv_endpoint") == "node001:29600"
    assert flag(cmd, "--rdzv_id") == "2025-01-02_10-11-12-sft-tiny"  # the same on every node: from the run directory
    assert "--master_port" not in cmd and cmd[-3:] == ["-m", "my.worker", str(run_dir.resolve())]
    explicit = torchrun_command(launcher(nnodes=2, rdzv_endpoint="10.0.0.5:1234"), run_dir)
    assert flag(explicit, "--rdzv_endpoint") == "10.0.0.5:1234"
    assert flag(torchrun_command(launcher(nnodes=2, master_addr="fd00::1"), run_dir), "--rdzv_endpoint") == "[fd00::1]:29500"


@pytest.mark.parametrize("bad, words", [(dict(node_rank=2, nnodes=2), "launcher.node_rank=2"),
                                        (dict(nproc_per_node=0), "launcher.nproc_per_node=0"),
                                        (dict(nnodes=2, rdzv_endpoint="node001"), "host:port")])
def test_bad_settings_are_one_sentence(tmp_path, bad, words):
    with pytest.raises(ConfigError, match=words):
        torchrun_command(launcher(**bad), tmp_path)


def test_backend(no_cuda, monkeypatch):
    assert resolve_backend("auto", "cpu") == "gloo" and resolve_backend("auto", "auto") == "gloo"
    assert resolve_backend("auto", "cuda") == "nccl" and resolve_backend("gloo", "cuda") == "gloo"
    with pytest.raises(ConfigError, match="launcher.backend=nccl needs CUDA"):
        resolve_backend("nccl", "cpu")
    with pytest.raises(ConfigError, match="launcher.backend=mpi"):
        resolve_backend("mpi", "cpu")
    env = worker_env(launcher(), "cpu", base={})
    assert env[BACKEND_ENV] == "gloo" and int(env["OMP_NUM_THREADS"]) >= 1
    assert "OMP_NUM_THREADS" not in worker_env(launcher(), "cpu", base={"OMP_NUM_THREADS": "3"})
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "auto") == "nccl" and resolve_backend("auto", "cpu") == "gloo"


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path, capsys, no_cuda):
    run_dir = tmp_path / "2025-01-02" / "10-11-12-sft-tiny"
    outcome = launch(launcher(dry_run=True, master_port=29555), run_dir, device="cpu")
    out = capsys.readouterr().out
    assert outcome.dry_run and outcome.returncode == 0 and outcome.pid is None
    assert f"{BACKEND_ENV}=gloo" in out and "torch.distributed.run --nnodes 1 --nproc_per_node 2" in out
    assert "--master_port 29555" in out and f"-m medgpt.launch.worker {run_dir.resolve()}" in out and "sbatch" not in out

    text = dry_run_text(launcher(nnodes=2, nproc_per_node=4, master_addr="node001", backend="gloo"), run_dir, device="cpu")
    assert "2 nodes x 4 processes" in text
    node0, node1 = (line for line in text.splitlines() if line.lstrip().startswith("node "))
    assert "node 0:" in node0 and "--node_rank 0" in node0 and "node 1:" in node1 and "--node_rank 1" in node1
    assert all("--rdzv_endpoint node001:29500" in n and "--rdzv_id 2025-01-02_10-11-12-sft-tiny" in n for n in (node0, node1))
    assert "#SBATCH --nodes=2" in text and "srun" in text  # multi-node: the SLURM script too


def test_sbatch_script(tmp_path):
    run_dir = tmp_path / "2025-01-02" / "10-11-12-sft-tiny"
    script = sbatch_script(launcher(nnodes=4, nproc_per_node=8, master_port=29611), run_dir, partition="gpu", time=90,
                           setup=["source .venv/bin/activate"], python="python")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=01:30:00", "--signal=TERM@120",
                      f"--output={run_dir.resolve()}/slurm-%j.out"):
        assert f"#SBATCH {directive}" in lines
    assert "source .venv/bin/activate" in lines
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script and "MASTER_PORT=29611" in lines
    assert f"{BACKEND_ENV}=nccl" in script  # GPUs per node: nccl, also when the machine writing the script has none
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=1" in srun
    for part in ("--nnodes 4 --nproc_per_node 8", '--node_rank "$SLURM_NODEID"', "--rdzv_backend c10d",
                 '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"', '--rdzv_id "$SLURM_JOB_ID"', "--max_restarts 0",
                 f"-m medgpt.launch.worker {run_dir.resolve()}"):
        assert part in srun
    cpu = sbatch_script(launcher(nnodes=2, rdzv_endpoint="head:2222"), run_dir, gpus_per_node=0)
    assert "--gpus-per-node" not in cpu and f"{BACKEND_ENV}=gloo" in cpu and "MASTER_ADDR=head " in cpu and "MASTER_PORT=2222" in cpu
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell syntax


# ---------------------------------------------------------------- pre-flight checks


def test_occupied_port_is_one_sentence_naming_it():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            check_port_free("127.0.0.1", port)
        assert f"launcher.master_port={port} is already in use" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ConfigError, match=str(port)):
            preflight(launcher(master_port=port), "cpu")
        preflight(launcher(master_port=port, nnodes=2, node_rank=1), "cpu")  # not the rendezvous host: not checked


def test_port_in_time_wait_is_free():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
        time.sleep(0.1)
        client.close()
    check_port_free("127.0.0.1", port)


def test_more_ranks_than_gpus(one_gpu):
    with pytest.raises(ConfigError) as err:
        check_devices(2, "cuda")
    assert "launcher.nproc_per_node=2" in str(err.value) and "sees 1 GPU" in str(err.value)
    check_devices(1, "auto")
    with pytest.raises(ConfigError, match="nproc_per_node=2"):
        preflight(launcher(master_port=0), "auto")


def test_cpu_ranks_above_cores_only_warn(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="medgpt.launch"):
        check_devices((os.cpu_count() or 1) + 1, "cpu")
    assert "CPU cores" in caplog.text
    with pytest.raises(ConfigError, match="sees no GPU"):
        check_devices(1, "cuda")


# ---------------------------------------------------------------- error files and torchrun's summary

SUMMARY = """
============================================================
launch_helpers.dist_worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-28_07:48:57
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 5706)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 5706
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_07:48:56
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 5707)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 5707
============================================================
"""


def test_first_failure_from_error_files_and_torchrun_summary(tmp_path):
    failures = tr.torchrun_failures("noise\n" + SUMMARY)
    assert [(f["rank"], f["exitcode"], f["root_cause"]) for f in failures] == [(1, -9, True), (0, -15, False)]
    assert tr.first_failure([], failures) == (1, "rank 1 was killed by SIGKILL (exit -9)")

    record_worker_error(tmp_path, 0, RuntimeError("Connection closed by peer\nmore"))
    errors = tr.read_worker_errors(tmp_path)
    assert errors[0]["message"] == "Connection closed by peer" and errors[0]["type"] == "RuntimeError"
    killed_at = errors[0]["time"] - 0.5  # rank 1 died just before rank 0's collective broke
    failures[0]["time"] = float(int(killed_at))
    assert tr.first_failure(errors, failures)[0] == 1  # the silent death is the cause, not its consequence
    failures[0]["time"] += 60  # killed long after (e.g. SIGKILL at the end of the shutdown timeout): a consequence
    assert tr.first_failure(errors, failures)[0] == 0

    time.sleep(0.01)
    record_worker_error(tmp_path, 3, ConfigError("data.path=x does not exist: check the path."))
    errors = tr.read_worker_errors(tmp_path)
    assert [e["rank"] for e in errors] == [0, 3]  # earliest first
    assert tr.error_sentence(errors[1]) == "rank 3: data.path=x does not exist: check the path."


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_worker_entry_point(tmp_path, monkeypatch, restore_logging):
    run_dir = run_dir_with_config(tmp_path)
    monkeypatch.setenv("RANK", "1")

    def fails(cfg, rd):
        assert cfg.name == "launch-test" and rd == run_dir
        logging.getLogger("medgpt").info("rank one speaking")
        raise ConfigError("lora.r=0 is not a rank: use 8 or more.")

    assert worker.main([str(run_dir)], target=fails) == 1
    error = json.loads((run_dir / ".rank1.error").read_text())
    assert error["rank"] == 1 and error["user_error"] and error["message"] == "lora.r=0 is not a rank: use 8 or more."
    assert "rank one speaking" in (run_dir / "train.rank1.log").read_text() and not (run_dir / "train.log").exists()

    monkeypatch.setenv("RANK", "0")

    def interrupted(cfg, rd):
        raise RunInterrupted(signal.SIGTERM, 7, "ckpt-7")

    assert worker.main([str(run_dir)], target=interrupted) == 128 + signal.SIGTERM
    result = json.loads((run_dir / tr.RESULT_FILE).read_text())
    assert result == {"status": "interrupted", "signum": signal.SIGTERM, "step": 7, "checkpoint": "ckpt-7"}
    assert "interrupted by SIGTERM at step 7" in (run_dir / "train.log").read_text()
    assert worker.main([str(run_dir)], target=lambda cfg, rd: {"train_loss": 1.5}) == 0
    assert json.loads((run_dir / tr.RESULT_FILE).read_text()) == {"status": "completed", "summary": {"train_loss": 1.5}}
    assert worker.main([], target=fails) == 2


# ---------------------------------------------------------------- real launches: torchrun, 2 CPU processes


def child_env(mode: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(HELPERS.parent), os.environ.get("PYTHONPATH")])),
            "MEDGPT_TEST_LAUNCH_MODE": mode}


def assert_nothing_left(run_dir: Path, outcome) -> None:
    pids = [int((run_dir / f"rank{r}.pid").read_text()) for r in (0, 1)] + [outcome.pid]
    deadline = time.monotonic() + 5  # reaping by init can lag a moment
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]
    marked = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(LAUNCH_ID_ENV) == outcome.launch_id:
                marked.append(p.pid)
        except psutil.Error:
            pass
    assert not marked


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_ranks_run(tmp_path, no_cuda):
    run_dir = run_dir_with_config(tmp_path)
    (run_dir / ".rank5.error").write_text("{}")  # stale, from an earlier launch in the same directory
    outcome = launch(launcher(master_port=free_port()), run_dir, env=child_env("ok"), module=TEST_MODULE, device="cpu", timeout=90)
    assert outcome.ok and outcome.returncode == 0 and not outcome.interrupted
    assert outcome.summary == {"sum": 3.0, "world_size": 2}  # rank 0's return value
    assert [(run_dir / f"rank{r}.ok").read_text() for r in (0, 1)] == ["3.0 2 launch-test gloo"] * 2
    assert not list(run_dir.glob(".rank*")), "stale error files and the result file are gone"
    assert_nothing_left(run_dir, outcome)


def test_failing_rank_stops_all_and_is_named(tmp_path, no_cuda):
    run_dir = run_dir_with_config(tmp_path)
    outcome = launch(launcher(master_port=0), run_dir, env=child_env("fail"), module=TEST_MODULE, device="cpu", timeout=60)
    assert not outcome.timed_out and outcome.returncode != 0 and not outcome.interrupted
    assert outcome.failed_rank == 1 and outcome.error == "rank 1 failed with ValueError: rank 1 failed on purpose"
    assert "rank 1 failed on purpose" in (run_dir / "train.rank1.log").read_text()
    assert_nothing_left(run_dir, outcome)


def test_rank_killed_by_signal_falls_back_to_torchrun_summary(tmp_path, no_cuda):
    run_dir = run_dir_with_config(tmp_path)
    outcome = launch(launcher(master_port=0), run_dir, env=child_env("kill"), module=TEST_MODULE, device="cpu", timeout=60)
    assert not outcome.timed_out and outcome.returncode != 0
    assert outcome.failed_rank == 1 and outcome.error == "rank 1 was killed by SIGKILL (exit -9)"
    assert_nothing_left(run_dir, outcome)


def start_launcher(run_dir: Path, mode: str, *extra: str) -> subprocess.Popen:
    """tests/launch_helpers/run_launch.py in its own process (it is what gets signalled), once both ranks are ready."""
    proc = subprocess.Popen([sys.executable, str(HELPERS / "run_launch.py"), str(run_dir), mode, "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not all((run_dir / f"rank{r}.ready").exists() for r in (0, 1)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks did not get ready: {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    return proc


def finish(proc: subprocess.Popen) -> tuple[SimpleNamespace, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = next((line for line in out.splitlines() if line.startswith("OUTCOME ")), None)
    assert line, err[-3000:]
    return SimpleNamespace(**json.loads(line[len("OUTCOME "):])), err


def test_sigint_to_the_launcher_reaches_every_rank(tmp_path):
    run_dir = run_dir_with_config(tmp_path)
    proc = start_launcher(run_dir, "wait")
    proc.send_signal(signal.SIGINT)  # as Ctrl-C does
    outcome, err = finish(proc)
    assert proc.returncode == 128 + signal.SIGINT == outcome.returncode, err[-3000:]
    assert outcome.interrupted and outcome.signum == signal.SIGINT and outcome.error is None
    assert [(run_dir / f"rank{r}.signal").read_text() for r in (0, 1)] == ["SIGINT", "SIGINT"]
    assert outcome.interrupt["step"] == 3 and outcome.interrupt["checkpoint"].endswith("checkpoint-3")
    assert "SIGINT received" in err
    assert_nothing_left(run_dir, outcome)


def test_ranks_outliving_a_killed_torchrun_are_stopped(tmp_path):
    run_dir = run_dir_with_config(tmp_path)
    proc = start_launcher(run_dir, "stubborn", "1")  # the ranks ignore SIGTERM; 1 s grace before SIGKILL
    torchrun = next(p for p in psutil.Process(proc.pid).children() if "torch.distributed.run" in " ".join(p.cmdline()))
    torchrun.kill()  # the ranks run in their own sessions: they outlive it
    outcome, err = finish(proc)
    assert outcome.returncode == 128 + signal.SIGKILL and outcome.leftovers == 2, err[-3000:]
    assert outcome.error.startswith("torchrun was killed by SIGKILL")
    assert_nothing_left(run_dir, outcome)


# ---------------------------------------------------------------- the parent's side (medgpt.launch.run)


def test_launch_workers_turns_the_outcome_into_what_run_py_handles(tmp_path, monkeypatch, no_cuda):
    from medgpt.launch import run as bridge

    cfg = OmegaConf.create({"launcher": vars(launcher(nproc_per_node=3, nnodes=2)), "hardware": {"device": "cpu"}})
    assert bridge.distributed_info(cfg) == {"world_size": 6, "backend": "gloo", "launcher": "torchrun"}
    outcomes = iter([tr.LaunchOutcome(0, summary={"train_loss": 1.0}),
                     tr.LaunchOutcome(130, interrupted=True, signum=2, interrupt={"signum": 2, "step": 4, "checkpoint": "c-4"}),
                     tr.LaunchOutcome(1, error="rank 1 failed with ValueError: boom", failed_rank=1)])
    seen = []
    monkeypatch.setattr(bridge, "launch", lambda launcher_, path, device, **kw: seen.append(device) or next(outcomes))
    assert bridge.launch_workers(cfg, tmp_path) == {"train_loss": 1.0} and seen == ["cpu"]
    with pytest.raises(RunInterrupted) as stopped:
        bridge.launch_workers(cfg, tmp_path)
    assert (stopped.value.signum, stopped.value.step, stopped.value.checkpoint) == (2, 4, "c-4")
    (tmp_path / "train.rank1.log").write_text("")
    with pytest.raises(bridge.WorkerFailed, match=r"^rank 1 failed with ValueError: boom \(its log: .*train.rank1.log\)\.$"):
        bridge.launch_workers(cfg, tmp_path)
