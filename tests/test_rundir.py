"""The run directory's guarantees: never shared, never overwritten, crash-detected, typed summary, one-sentence errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

from medgpt.errors import ArtefactError, ConfigError
from medgpt.tracking.rundir import RunDir, RunSummary, check_writable, read_summary, resolve_run, trained_run

CLAIM_AND_HANG = """
import sys, time
from medgpt.tracking.rundir import RunDir
run = RunDir.claim(sys.argv[1], named_by_user=True)
run._write_owner()
run.begin_summary()
print("claimed", flush=True)
time.sleep(60)
"""


def _finished_run(path: Path, status: str = "completed") -> RunDir:
    run = RunDir.claim(path, named_by_user=True)
    run.config.write_text("method: {name: sft}\n")
    run.begin_summary()
    run.finish(status, {"steps": 3})
    run.release()
    return run


def test_a_live_run_is_never_shared(tmp_path):
    first = RunDir.claim(tmp_path / "run", named_by_user=True)
    with pytest.raises(ConfigError, match=r"run is in use by another run.*choose another hydra.run.dir"):
        RunDir.claim(tmp_path / "run", named_by_user=True)
    second = RunDir.claim(tmp_path / "run", named_by_user=False)  # a default name: the next free one
    assert second.path == tmp_path / "run-2"
    third = RunDir.claim(tmp_path / "run", named_by_user=False)
    assert third.path == tmp_path / "run-3"
    for run in (first, second, third):
        run.release()


@pytest.mark.parametrize("status", ["completed", "failed", "interrupted"])
def test_a_directory_holding_a_run_is_never_trained_into_again(tmp_path, status):
    run = _finished_run(tmp_path / "run", status)
    before = (run.config.read_text(), run.summary_path.read_text())
    with pytest.raises(ConfigError, match=f"already holds a {status} run"):
        RunDir.claim(run.path, named_by_user=True)
    assert (run.config.read_text(), run.summary_path.read_text()) == before
    assert RunDir.claim(run.path, named_by_user=False).path == tmp_path / "run-2"


LIVE_ARGS = ("model=tiny", "debug=smoke", "method.max_steps=2", "method.sample_questions=0")


def test_a_launch_into_a_live_runs_directory_is_refused_before_writing(tmp_path):
    """In this process: a claim held as a live run holds it keeps a launch out (flock locks conflict within one process too);
    once it is let go the next launch trains there, and a launch after that is refused by the finished run."""
    from conftest import launch

    args = (*LIVE_ARGS, f"hydra.run.dir={tmp_path / 'b'}")
    live = RunDir.claim(tmp_path / "b", named_by_user=True)
    live._write_owner()
    before = sorted(p.name for p in (tmp_path / "b").iterdir())
    refused = launch(*args)
    assert refused.returncode == 1 and "is in use by another run (pid" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == before  # nothing written
    live.release()
    live.owner_path.unlink()
    trained = launch(*args)
    assert trained.returncode == 0, trained.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]
    config = (tmp_path / "b/config.yaml").read_text()
    again = launch(*args, "method.learning_rate=3e-3")  # a re-run into the finished directory: refused, its config.yaml untouched
    assert again.returncode == 1 and "already holds a completed run" in again.stderr
    assert (tmp_path / "b/config.yaml").read_text() == config


@pytest.mark.slow  # two fresh interpreters racing (~15 s of CPU); the test above covers each side in this process
def test_two_processes_into_one_named_directory_do_not_mix(tmp_path):
    """The reliability check's case, end to end: one trains, the other is refused before writing anything."""
    from conftest import launch

    args = (*LIVE_ARGS, f"hydra.run.dir={tmp_path / 'b'}")
    procs = [subprocess.Popen([sys.executable, "launch.py", *args, f"method.learning_rate={lr}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for lr in (1e-3, 3e-3)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 1)
    assert "is in use by another run" in refused and "Traceback" not in refused
    steps = [json.loads(line)["step"] for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2]
    again = launch(*args)  # a re-run into the finished directory: refused, its config.yaml untouched
    assert again.returncode == 1 and "already holds a completed run" in again.stderr


def test_a_killed_run_reads_as_crashed_and_is_resumable(tmp_path):
    path = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    (path / "config.yaml").write_text("method: {name: sft}\n")
    assert RunDir(path).status() == "running"  # alive: its lock is held
    with pytest.raises(ConfigError, match="is still running"):
        RunDir(path).take_over()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((path / "summary.json").read_text())["status"] == "running"  # what it wrote
    assert RunDir(path).status() == "crashed"  # what readers see
    assert read_summary(path)["status"] == "crashed"
    assert resolve_run("latest", tmp_path, status=("interrupted", "crashed")) == path
    RunDir(path).take_over()  # resume=true may take it over now


def test_a_stale_heartbeat_on_another_host_reads_as_crashed(tmp_path):
    run = RunDir(tmp_path)
    run.begin_summary()
    owner = {"pid": 1, "host": "elsewhere", "started": 0, "heartbeat": time.time()}
    run.owner_path.write_text(json.dumps(owner))
    assert run.status() == "running"
    run.owner_path.write_text(json.dumps({**owner, "heartbeat": time.time() - 3600}))
    assert run.status() == "crashed"


def test_summary_updates_never_lose_a_field(tmp_path):
    run = RunDir(tmp_path)
    run.begin_summary()

    def add(i: int) -> None:
        for j in range(10):
            run.update_summary({f"k{i}_{j}": j})

    threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads(run.summary_path.read_text())
    assert all(data[f"k{i}_{j}"] == j for i in range(4) for j in range(10))
    assert data["version"] == 2 and data["status"] == "running"


def test_other_ranks_never_write(tmp_path):
    worker = RunDir(tmp_path, rank=1)
    worker.begin_summary()
    worker.update_summary({"steps": 1})
    assert not worker.summary_path.exists()
    assert worker.log_file().name == "train.rank1.log" and RunDir(tmp_path, rank=0).log_file().name == "train.log"


def test_summary_is_typed_and_old_summaries_load(tmp_path):
    # summary.json as main wrote it before the typed summary (no version, no stop ids, no owner file)
    old = {"status": "completed", "stage": "sft", "base_model_path": str(tmp_path / "base"), "steps": 8, "reference": {"kind": "x"},
           "eval_reward_accuracy": 0.5}
    (tmp_path / "base").mkdir()
    (tmp_path / "config.yaml").write_text("method: {name: sft}\n")
    (tmp_path / "summary.json").write_text(json.dumps(old))
    summary = RunDir(tmp_path).read_summary()
    assert summary.version == 1 and summary.status == "completed" and summary.steps == 8
    assert summary.get("reference") == {"kind": "x"} and summary.extra["eval_reward_accuracy"] == 0.5
    assert RunDir(tmp_path).base_model_path() == str(tmp_path / "base")
    assert summary.to_dict()["reference"] == {"kind": "x"}  # stage fields stay at the top level
    assert set(RunSummary.fields()) >= {"status", "version", "stop_token_ids", "world_size", "peak_memory_gb"}


def test_base_model_of_an_old_run_comes_from_its_adapter(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    assert RunDir(tmp_path).base_model_path() == "/models/base"
    assert RunDir(tmp_path).weights() == ("adapter", tmp_path / "adapter")


def test_a_pipeline_root_stands_for_its_last_stage(tmp_path):
    stage = tmp_path / "2-sft"
    stage.mkdir()
    (stage / "config.yaml").write_text("x: 1\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "final_run": str(stage)}))
    assert trained_run(tmp_path) == stage


def test_unwritable_output_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(blocker / "run", "hydra.run.dir")
    with pytest.raises(ConfigError, match="cannot create the run directory"):
        RunDir.claim(blocker / "run", named_by_user=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="read-only"):
            check_writable(ro / "run", "hydra.run.dir")


def test_unwritable_run_dir_on_the_command_line_is_one_sentence(tmp_path):
    from conftest import launch

    (tmp_path / "f").write_text("")
    res = launch("model=tiny", "debug=smoke", f"hydra.run.dir={tmp_path / 'f' / 'run'}")
    assert res.returncode == 1 and "is a file, not a folder" in res.stderr and "Traceback" not in res.stderr


def test_unwritable_default_run_dir_is_one_sentence(tmp_path, capsys):
    """The default directory (paths.output_dir from ${hydra:runtime.cwd}) is checked too: before, resolving it in the
    callback failed ("HydraConfig was not set", a warning on every run) and the check was skipped."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from medgpt.config import register_configs
    from medgpt.tracking.rundir import RunDirCheck

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["model=tiny"], return_hydra_config=True)
    (tmp_path / "f").write_text("")
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(tmp_path / "f")  # outputs/ would go under a file
    with pytest.raises(SystemExit) as stop:
        RunDirCheck().on_run_start(cfg)
    assert stop.value.code == 1
    assert f"hydra.run.dir={tmp_path / 'f' / 'outputs'}" in capsys.readouterr().err


def test_a_failed_save_rescues_the_weights(tmp_path, monkeypatch):
    from medgpt.stages import training

    saved = []

    def fake_save(trainer, tokenizer, template, out, is_adapter):
        if out.parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        saved.append(out)

    monkeypatch.setattr(training, "_save", fake_save)
    cfg = SimpleNamespace(lora=SimpleNamespace(name="lora"))
    with pytest.raises(ArtefactError, match=r"could not save the adapter .*Permission denied.*saved to .*medgpt-rescue-"):
        training.save_artefacts(RunDir(tmp_path), None, None, None, cfg)
    assert saved and saved[0].name.startswith(f"medgpt-rescue-{tmp_path.name}-")
