"""Training guards and trackers, in process: the loss watchdog on an injected NaN and on spikes, early
stopping, the interrupt guard's flags, the memory estimate, trackers that fail without stopping training,
and the sweep summary rewritten from job directories as they appear."""

from __future__ import annotations

import csv
import json
import math
import os
import signal

import pytest
from transformers import TrainerControl, TrainerState

from medgpt.tracking.guards import EarlyStopping, InterruptGuard, LossWatchdog


def feed(watchdog: LossWatchdog, losses: list[float]) -> tuple[TrainerControl, int | None]:
    """Logs `losses` at steps 1, 2, ...; returns the control and the step at which the watchdog stopped training."""
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        watchdog.on_log(None, state, control, logs={"loss": loss})
        if control.should_training_stop:
            return control, step
    return control, None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_watchdog_stops_at_once_on_an_injected_non_finite_loss(bad):
    watchdog = LossWatchdog(threshold=2.0, patience=3)
    control, stopped = feed(watchdog, [2.5, 2.4, 2.3, bad, 2.2])
    assert stopped == 4 and control.should_save  # a checkpoint is saved with the stop
    assert watchdog.reason == f"the training loss is {bad} at step 4"


def test_watchdog_stops_after_patience_spiking_steps():
    watchdog = LossWatchdog(threshold=2.0, patience=3, window=5)
    control, stopped = feed(watchdog, [2.0, 1.9, 2.1, 2.0, 7.0, 2.0, 7.0, 8.0, 9.0, 2.0])
    assert stopped == 9  # the single spike at step 5 was forgiven; steps 7-9 spiked three times in a row
    assert "more than 2 above its recent median (2) for 3 steps in a row, to 9 at step 9" in watchdog.reason


def test_watchdog_lets_a_normal_run_through():
    losses = [8 * math.exp(-0.1 * i) + 0.5 * (-1) ** i for i in range(80)]  # falling, noisy, ending near zero
    control, stopped = feed(LossWatchdog(threshold=2.0, patience=1), losses)
    assert stopped is None and not control.should_save


def test_early_stopping_counts_evaluations_without_improvement_during_training():
    stopper, state, control = EarlyStopping(patience=2), TrainerState(), TrainerControl()
    stopper.on_evaluate(None, state, control, metrics={"eval_loss": 1.0})  # before training: not counted
    stopper.on_train_begin(None, state, control)
    for step, loss in [(10, 3.0), (20, 2.5), (30, 2.6), (40, 2.5)]:
        state.global_step = step
        stopper.on_evaluate(None, state, control, metrics={"eval_loss": loss})
    assert control.should_training_stop and stopper.stopped_at == 40 and stopper.best == 2.5


def test_interrupt_guard_turns_a_signal_into_save_and_stop():
    guard, state, control = InterruptGuard(), TrainerState(), TrainerControl()
    previous = signal.getsignal(signal.SIGTERM)
    guard.on_train_begin(None, state, control)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        guard.on_step_end(None, state, control)
    finally:
        guard.on_train_end(None, state, control)
    assert guard.signum == signal.SIGTERM and control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored after training


def test_memory_estimate_counts_parameters_and_optimizer_state(tiny_path):
    import torch
    from omegaconf import OmegaConf

    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import Placement, load_model
    from medgpt.stages.training import estimate_memory

    model = load_model(str(tiny_path), Placement("cpu", torch.float32, "sdpa"))
    lora = OmegaConf.create({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None, "modules_to_save": None,
                             "use_dora": False, "quantization": None})
    model = apply_adapter(model, lora, OmegaConf.create({"target_modules": None}), False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate_memory(model, batch_size=2, seq_len=128)
    assert est["parameters"] == total and est["trainable_parameters"] == trainable and 0 < trainable < total / 10
    assert est["weights_gb"] == pytest.approx(total * 4 / 2**30, abs=1e-4)
    assert est["optimizer_gb"] == pytest.approx(trainable * 8 / 2**30, abs=1e-4)  # AdamW: two fp32 values per trainable parameter
    assert est["activations_gb"] > estimate_memory(model, batch_size=1, seq_len=128)["activations_gb"]
    assert estimate_memory(model, 2, 128, gradient_checkpointing=True)["activations_gb"] < est["activations_gb"]


def test_a_failing_tracker_never_stops_training(caplog):
    from medgpt.tracking import loggers

    class Broken(loggers.Tracker):
        name = "W&B"
        calls = 0

        def _log(self, row):
            Broken.calls += 1
            raise ConnectionError("network gone")

    tracker = Broken()
    tracker.log({"step": 1, "loss": 2.0})
    tracker.log({"step": 2, "loss": 1.9})  # switched off after the first failure: no second attempt, no exception
    tracker.finish({"eval_loss": 1.0}, "completed")
    assert Broken.calls == 1 and "W&B log failed (ConnectionError: network gone)" in caplog.text


def test_a_tracker_that_cannot_start_is_replaced_by_a_no_op(monkeypatch, tmp_path, caplog):
    from omegaconf import OmegaConf

    from medgpt.tracking import loggers

    def refuse(cfg, run_dir):
        raise RuntimeError("wandb-core did not start")

    monkeypatch.setitem(loggers.TRACKERS, "wandb", refuse)
    tracker = loggers.start(OmegaConf.create({"logger": {"name": "wandb"}}), tmp_path)
    assert type(tracker) is loggers.Tracker and loggers.active() is tracker
    assert "training goes on" in caplog.text


def test_wandb_goes_offline_without_an_api_key(monkeypatch, tmp_path):
    from medgpt.tracking.loggers import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode() == ("offline", "no API key: run `wandb login` or set WANDB_API_KEY")


def test_sweep_summary_is_rewritten_from_the_jobs_found_so_far(tmp_path):
    from medgpt.tracking.sweep import write_sweep_summary

    def job(num, lr, status, eval_loss=None):
        d = tmp_path / f"{num}-method.learning_rate={lr}"
        d.mkdir()
        (d / "overrides.txt").write_text(f"model=tiny\nmethod.learning_rate={lr}\n")
        (d / "summary.json").write_text(json.dumps({"status": status, "eval_loss": eval_loss, "train_loss": eval_loss}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")

    job(0, "0.001", "completed", 2.5)
    assert write_sweep_summary(tmp_path).exists()  # after the first job already
    job(1, "0.01", "completed", 2.0)
    job(10, "0.1", "running")  # a job the sweep died in
    write_sweep_summary(tmp_path, "eval_loss", "maximize")
    with open(tmp_path / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["method.learning_rate"], r["status"], r["eval_loss"]) for r in rows] == [
        ("0", "0.001", "completed", "2.5"), ("1", "0.01", "completed", "2.0"), ("10", "0.1", "running", "")]
    assert [r["best"] for r in rows] == ["*", "", ""]  # maximize: the higher eval loss is best
    assert "common overrides: `model=tiny`" in (tmp_path / "sweep_summary.md").read_text()


@pytest.mark.parametrize("override,message", [
    ("method.early_stopping_patience=-1", "method.early_stopping_patience=-1 is invalid"),
    ("watchdog.patience=0", "watchdog.patience=0 is invalid"),
    ("sweep.direction=up", "sweep.direction"),
])
def test_guard_and_sweep_knobs_are_validated(override, message):
    from conftest import compose

    from medgpt.config import validate
    from medgpt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        validate(compose([override]))
