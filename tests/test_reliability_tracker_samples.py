"""logger.log_samples: the sample answers and the data statistics reach W&B / TensorBoard only when it is true
(summary.json keeps them always)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import compose, dialogue, launch, write_jsonl
from test_sweep_optuna import wandb_records

from medgpt.tracking.loggers import Tracker

SUMMARY = {"eval_loss": 1.5, "steps": 4, "data": {"format": "sharegpt", "train": {"examples": 12, "tokens": 900}},
           "samples": [{"question": "Is 38.5 C a fever?", "reference": "Yes.", "before": "qqq", "after": "Yes, it is."}]}


class Recording(Tracker):
    name = "recording"

    def __init__(self, log_samples: bool):
        super().__init__(log_samples)
        self.finished, self.samples = None, None

    def _finish(self, summary, status):
        self.finished = summary

    def _samples(self, rows):
        self.samples = rows


def test_samples_and_data_statistics_stay_out_of_the_tracker_by_default():
    tracker = Recording(log_samples=False)
    tracker.finish(SUMMARY, "completed")
    assert tracker.finished == {"eval_loss": 1.5, "steps": 4} and tracker.samples is None


def test_log_samples_true_sends_them():
    tracker = Recording(log_samples=True)
    tracker.finish(SUMMARY, "completed")
    assert tracker.finished == SUMMARY
    assert tracker.samples == [["Is 38.5 C a fever?", "Yes.", "qqq", "Yes, it is."]]


def test_the_config_field_defaults_to_false():
    for logger in ("none", "wandb", "tensorboard"):
        cfg = compose([f"logger={logger}"])
        assert cfg.logger.log_samples is False
    assert compose(["logger=wandb", "logger.log_samples=true"]).logger.log_samples is True


def _wandb_summary(run_dir) -> dict:
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    summary = {}
    for r in wandb_records(run_file):
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return summary


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("log_samples")
    data = write_jsonl(folder / "train.jsonl", [dialogue(i) for i in range(16)])
    args = ("model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
            "method.max_steps=2", "method.sample_questions=1", "logger=wandb")
    with ThreadPoolExecutor(2) as pool:
        default = pool.submit(launch, *args, f"hydra.run.dir={folder / 'default'}", env={"WANDB_MODE": "offline"})
        opted_in = pool.submit(launch, *args, "logger.log_samples=true", f"hydra.run.dir={folder / 'opted_in'}", env={"WANDB_MODE": "offline"})
        for res in (default.result(), opted_in.result()):
            assert res.returncode == 0, res.stderr[-2000:]
    return folder


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_wandb_gets_no_samples_or_data_statistics_by_default(wandb_runs):
    run = wandb_runs / "default"
    local = json.loads((run / "summary.json").read_text())
    assert local["samples"] and local["samples"][0]["after"] is not None and local["data"]["train"]["examples"] == 12  # kept locally
    summary = _wandb_summary(run)
    assert summary["status"] == "completed" and summary["eval_loss"] == pytest.approx(local["eval_loss"])
    assert "samples" not in summary and not any(k.startswith("data") for k in summary), sorted(summary)
    everything = b"".join(p.read_bytes() for p in (run / "wandb").rglob("*") if p.is_file())
    assert local["samples"][0]["question"].encode() not in everything  # the question text is nowhere in W&B's files


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_wandb_gets_them_with_log_samples_true(wandb_runs):
    run = wandb_runs / "opted_in"
    local = json.loads((run / "summary.json").read_text())
    summary = _wandb_summary(run)
    assert summary["data/train/examples"] == local["data"]["train"]["examples"] == 12
    assert summary["samples"]["_type"] == "table-file" and summary["samples"]["nrows"] == len(local["samples"]) == 1
    (table_file,) = (run / "wandb").glob(f"offline-run-*/files/{summary['samples']['path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["question", "reference", "before", "after"]
    assert table["data"][0] == [local["samples"][0][c] for c in table["columns"]]
