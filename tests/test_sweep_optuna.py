"""A 2-trial Optuna search (sweep=lr_rank) on the tiny model, logged to W&B offline: the best trial at the
sweep root, and W&B's files inside each job directory with the same metrics as metrics.jsonl."""

from __future__ import annotations

import csv
import json
import re
import struct

import pytest
import yaml
from conftest import ROOT, dialogue, launch, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("optuna")
    data = write_jsonl(folder / "train.jsonl", [dialogue(i) for i in range(16)])
    sweep_dir = folder / "multirun"
    res = launch("-m", "hydra/sweeper=optuna", "sweep=lr_rank", "model=tiny", "debug=smoke", "hydra.sweeper.n_trials=2",
                 f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25", "method.max_steps=3",
                 "method.sample_questions=0", "logger=wandb", f"hydra.sweep.dir={sweep_dir}", timeout=400,
                 env={"WANDB_MODE": "offline"})
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-")[0]))
    return sweep_dir, jobs, res


def test_trials_sample_the_search_space(optuna_sweep):
    _, jobs, _ = optuna_sweep
    assert len(jobs) == 2
    for job in jobs:
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert 1e-5 <= cfg["method"]["learning_rate"] <= 1e-3 and cfg["lora"]["r"] in (4, 8, 16, 32)
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"


def test_best_trial_is_reported_at_the_sweep_root(optuna_sweep):
    sweep_dir, jobs, _ = optuna_sweep
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    evals = [json.loads((j / "summary.json").read_text())["eval_loss"] for j in jobs]
    best = jobs[evals.index(min(evals))]
    assert result["best_value"] == pytest.approx(min(evals))  # each trial returned its eval loss
    best_cfg = yaml.safe_load((best / "config.yaml").read_text())
    assert result["best_params"] == {"method.learning_rate": pytest.approx(best_cfg["method"]["learning_rate"]), "lora.r": best_cfg["lora"]["r"]}
    with open(sweep_dir / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["best"] for r in rows] == ["*" if j == best else "" for j in jobs]
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert f"Optuna best trial (optimization_results.yaml): method.learning_rate={result['best_params']['method.learning_rate']:.5g}" in md
    assert "| job | lora.r | method.learning_rate |" in md or "| job | method.learning_rate | lora.r |" in md
    # medgpt's own summary names the best job, with its sampled values (from the search space) and its metric
    n = best.name.split("-")[0]
    line = next(x for x in md.splitlines() if x.startswith("Best job: "))
    assert line.startswith(f"Best job: {n} (") and line.endswith(f"eval_loss = {min(evals):.5g}")
    assert f"lora.r={best_cfg['lora']['r']}" in line
    assert float(re.search(r"method\.learning_rate=([0-9.e+-]+)", line).group(1)) == pytest.approx(best_cfg["method"]["learning_rate"], rel=1e-4)
    space = yaml.safe_load((ROOT / "conf/sweep/lr_rank.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert space == {"method.learning_rate": "tag(log, interval(1e-5, 1e-3))", "lora.r": "choice(4, 8, 16, 32)"}  # what the jobs are checked against
    for row, job in zip(rows, jobs):  # the csv's values are the jobs' own config.yaml values
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        assert float(row["method.learning_rate"]) == pytest.approx(cfg["method"]["learning_rate"], rel=1e-4)
        assert int(row["lora.r"]) == cfg["lora"]["r"] and 1e-5 <= cfg["method"]["learning_rate"] <= 1e-3 and cfg["lora"]["r"] in (4, 8, 16, 32)


def wandb_records(run_file):
    """The records of a W&B transaction log (.wandb: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, records = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def test_wandb_offline_files_hold_the_metrics_config_and_summary(optuna_sweep):
    sweep_dir, jobs, _ = optuna_sweep
    job = jobs[0]
    (run_file,) = (job / "wandb").glob("offline-run-*/run-*.wandb")  # W&B's files are inside the run directory
    records = wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "medgpt" and run.display_name == job.name
    assert {"method=sft", "model=tiny", "lora=lora"} <= set(run.tags)
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"]["learning_rate"] == yaml.safe_load((job / "config.yaml").read_text())["method"]["learning_rate"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = read_jsonl(job / "metrics.jsonl")
    assert len(history) == len(rows)
    for logged, row in zip(history, rows):
        assert {k: v for k, v in logged.items() if not k.startswith("_")}.keys() == row.keys()  # the same keys as metrics.jsonl
        assert logged.get("loss", 0) == pytest.approx(row.get("loss", 0), rel=1e-5)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    assert summary["status"] == "completed"
    assert summary["eval_loss"] == pytest.approx(json.loads((job / "summary.json").read_text())["eval_loss"])


def test_group_is_the_sweep_and_both_jobs_share_it(optuna_sweep):
    sweep_dir, jobs, _ = optuna_sweep
    groups = set()
    for job in jobs:
        (run_file,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
        groups.add(next(r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run").run_group)
        assert yaml.safe_load((job / "config.yaml").read_text())["logger"]["group"] in groups
    assert groups == {f"{sweep_dir.parent.parent.name}-{sweep_dir.parent.name}-{sweep_dir.name}"}  # outputs/multirun/<date>/<time>
