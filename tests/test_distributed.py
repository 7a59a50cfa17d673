"""Multi-process training for real: `python launch.py ... launcher=torchrun launcher.nproc_per_node=2` on the CPU (gloo),
tiny model. DDP gives the same steps as one process with the same global batch; FSDP shards, trains and saves a loadable
adapter / full model; a failing rank ends the run in one sentence with nothing left behind; Ctrl-C to the parent stops
every rank after the same step with a checkpoint, and resume=true continues it.

Test hooks for the workers (a failing rank, slow steps) come from tests/launch_helpers/worker_hooks/sitecustomize.py,
put on PYTHONPATH only for the run under test. Each run marks its processes with MARK_ENV, so a test can look for
leftovers in /proc by that mark or by the run directory in their command line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch, read_jsonl
from transformers import TrainerControl, TrainerState

from medgpt.tracking import guards
from medgpt.tracking.guards import InterruptGuard

HOOKS = Path(__file__).resolve().parent / "launch_helpers" / "worker_hooks"
MARK_ENV = "MEDGPT_TEST_RUN_MARK"
# Same batches, same order, no randomness, fp32 (hardware=auto is bf16 on CPUs with avx512_bf16): one process with batch 4
# vs 2 ranks with batch 2 see the same global batch.
SAME_STEPS = ["model=tiny", "hardware=cpu", "data.max_samples=32", "method.max_steps=4", "method.learning_rate=1e-2", "method.lr_scheduler=constant",
              "method.warmup_ratio=0", "method.shuffle=false", "lora.dropout=0", "method.eval_steps=0"]
# Measured with transformers 5.24 / torch 2.13 on CPU: DDP and FSDP rows equal one process's to the 4 decimals
# metrics.jsonl keeps (unrounded: losses within 2e-6), adapters within 1.9e-5. Before DDP really wrapped the model
# (see medgpt.stages.training.evaluate_before_training) step 2 differed by 5e-3 and step 1's grad_norm by 1%.
LOSS_ATOL, GRAD_NORM_RTOL, WEIGHT_ATOL = 1e-4, 1e-4, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> list[str]:
    return ["launcher=torchrun", "launcher.nproc_per_node=2", f"launcher.master_port={free_port()}"]


def hooks_env(mark: str, **hooks: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])), MARK_ENV: mark, **hooks}


def steps(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("loss") is not None]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def leftovers(run: Path, mark: str, wait_s: float = 10.0) -> list[str]:
    """Live processes whose environment has this run's mark or whose command line names its directory."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(run) in cmdline or f"{MARK_ENV}={mark}".encode() in environ:
                found.append(f"{entry.name}: {cmdline[:200]}")
        if not found or time.monotonic() > deadline:  # a process that just exited may take a moment to be reaped
            return found
        time.sleep(0.2)


def assert_same_steps(reference: Path, run: Path) -> None:
    ref, got = steps(reference), steps(run)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["tokens_seen"] == a["tokens_seen"], "the same batches"
        assert b["loss"] == pytest.approx(a["loss"], abs=LOSS_ATOL), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=GRAD_NORM_RTOL), f"step {a['step']}"
    assert summary(run)["eval_loss"] == pytest.approx(summary(reference)["eval_loss"], abs=LOSS_ATOL)
    ref_w, got_w = adapter_weights(reference), adapter_weights(run)
    assert ref_w.keys() == got_w.keys()
    assert max((ref_w[k] - got_w[k]).abs().max().item() for k in ref_w) <= WEIGHT_ATOL


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    r = launch(*SAME_STEPS, "method.sample_questions=0", "hardware.batch_size=4", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.mark.slow  # a launcher and two ranks, each a fresh interpreter (~40 s of CPU); test_launch.py runs torchrun in the fast suite
def test_ddp_gives_the_steps_of_one_process(one_process, tmp_path):
    run = tmp_path / "ddp"
    r = launch(*SAME_STEPS, "method.sample_questions=0", "hardware.batch_size=2", *torchrun(), f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run)["world_size"] == 2 and summary(run)["backend"] == "gloo"
    assert_same_steps(one_process, run)


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_fsdp_lora_shards_trains_and_saves_a_loadable_adapter(one_process, tmp_path, tiny_path):
    run = tmp_path / "fsdp"
    r = launch("debug=smoke", *SAME_STEPS, "hardware.batch_size=2", "method.save_steps=2", "fsdp=full_shard", *torchrun(),
               f"hydra.run.dir={run}")  # debug=smoke also answers a held-out question before and after (generate on every rank)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "checkpoints" / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file(), "an FSDP checkpoint, not DDP's"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # one row per step (0: eval before)
    assert len(summary(run)["samples"]) == 1
    assert_same_steps(one_process, run)  # sharded, the same steps as one process

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_path))
    ids = torch.tensor([[1, 42, 7, 99, 5]])
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, str(run / "adapter"))
        after = model(ids).logits
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().max() > 0 for p in trained_b), "LoRA B starts at zero: every one trained"
    assert (after - before).abs().max() > 1e-3


@pytest.mark.slow  # the LoRA case above covers the FSDP path
def test_fsdp_full_finetune_saves_a_loadable_model(tmp_path, tiny_path):
    run = tmp_path / "fsdp-full"
    r = launch("model=tiny", "debug=smoke", "method.max_steps=3", "method.learning_rate=1e-3", "lora=none", "fsdp=full_shard",
               *torchrun(), f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1, 2, 3]
    from transformers import AutoModelForCausalLM

    base, trained = (AutoModelForCausalLM.from_pretrained(str(p)) for p in (tiny_path, run / "model"))
    base_sd, trained_sd = base.state_dict(), trained.state_dict()
    assert base_sd.keys() == trained_sd.keys()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], trained_sd[k])]
    assert any("layers.0." in k for k in changed) and any("layers.1." in k for k in changed)  # every unit trained
    with torch.no_grad():
        assert torch.isfinite(trained(torch.tensor([[1, 42, 7]])).logits).all()


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_a_failing_rank_ends_the_run_in_one_sentence_and_leaves_nothing(tmp_path):
    run, mark = tmp_path / "fail", uuid.uuid4().hex
    r = launch("model=tiny", "debug=smoke", "method.sample_questions=0", *torchrun(), f"hydra.run.dir={run}", timeout=180,
               env=hooks_env(mark, MEDGPT_TEST_FAIL_RANK="1", MEDGPT_TEST_FAIL_AT_STEP="1"))
    assert r.returncode == 1, r.stderr[-3000:]
    done = summary(run)
    assert done["status"] == "failed"
    assert done["error"].startswith("rank 1 failed with RuntimeError: rank 1 failed on purpose after step 1")
    assert "\n" not in done["error"]
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in last and last.startswith("run directory (marked failed)")
    assert not leftovers(run, mark)


@pytest.mark.slow  # two launches (~1 min on 2 cores)
def test_ctrl_c_stops_every_rank_after_one_step_and_resume_continues(tmp_path):
    run, mark = tmp_path / "ctrl-c", uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | hooks_env(mark, MEDGPT_TEST_STEP_DELAY_S="0.5")
    proc = subprocess.Popen([sys.executable, "launch.py", "model=tiny", "debug=smoke", "method.sample_questions=0", *torchrun(),
                             f"hydra.run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not (run / "metrics.jsonl").exists() or not any(r.get("step", 0) >= 2 for r in read_jsonl(run / "metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C to the launch.py parent (in a terminal only the parent gets it)
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    stopped = summary(run)
    assert stopped["status"] == "interrupted" and stopped["steps"] >= 2
    checkpoint = Path(stopped["checkpoint"])
    assert checkpoint == run / "checkpoints" / f"checkpoint-{stopped['steps']}" and (checkpoint / "trainer_state.json").is_file()
    for log in ("train.log", "train.rank1.log"):  # every rank stopped after the same step
        assert f"interrupted by SIGINT at step {stopped['steps']}" in (run / log).read_text(), log
    assert not leftovers(run, mark)

    r = launch(f"run={run}", "resume=true", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    done = summary(run)
    assert done["status"] == "completed" and done["steps"] == 8 and done["resumed_from"] == str(checkpoint)
    assert f"resuming from {checkpoint} (step {stopped['steps']})" in (run / "train.log").read_text()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(9))  # each step once, across the resume
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_interrupt_guard_takes_a_repeat_within_two_seconds_as_the_same_request(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(guards.time, "monotonic", lambda: clock[0])
    guard, state, control = InterruptGuard(), TrainerState(), TrainerControl()
    previous = signal.getsignal(signal.SIGINT)
    guard.on_train_begin(None, state, control)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line (main thread)
        os.kill(os.getpid(), signal.SIGINT)  # the same signal again at once (SLURM and the launcher both deliver it)
        clock[0] += 1.9
        os.kill(os.getpid(), signal.SIGTERM)  # SIGUSR1 from SLURM arrives forwarded as SIGTERM too
        guard.on_step_end(None, state, control)
        assert guard.signum == signal.SIGINT and control.should_save and control.should_training_stop
        clock[0] += 0.2  # 2.1 s after the first: asked again, stop at once
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached
    finally:
        guard.on_train_end(None, state, control)
    assert signal.getsignal(signal.SIGINT) is previous
