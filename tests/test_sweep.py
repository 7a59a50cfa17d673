"""Multirun sweeps end to end on the tiny model: one run directory per job, the sweep summary and plot,
a failed (diverging) job marked failed while the sweep goes on, TensorBoard files, and mode=compare."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from conftest import CONF, dialogue, launch, read_jsonl, write_jsonl

# lr=1e30 makes the loss NaN at step 2: the watchdog stops that job, the sweep goes on.
LEARNING_RATES = ("0.001", "0.01", "1e+30")  # as Hydra writes them back


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    data = write_jsonl(folder / "train.jsonl", [dialogue(i, turns=1 + i % 2) for i in range(24)])
    sweep_dir = folder / "multirun"
    res = launch("-m", "model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
                 "method.max_steps=4", "method.sample_questions=0", "method.warmup_ratio=0", "logger=tensorboard",
                 f"method.learning_rate={','.join(LEARNING_RATES)}", f"hydra.sweep.dir={sweep_dir}", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir, res


def job_dirs(sweep_dir):
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-")[0]))


def test_one_full_run_directory_per_job(sweep):
    sweep_dir, _ = sweep
    jobs = job_dirs(sweep_dir)
    assert [j.name.split("-")[0] for j in jobs] == ["0", "1", "2"]
    for job, lr in zip(jobs, LEARNING_RATES):
        assert f"method.learning_rate={lr}" in (job / "overrides.txt").read_text().splitlines()
        assert yaml.safe_load((job / "config.yaml").read_text())["method"]["learning_rate"] == float(lr)
        assert (job / "env.json").exists() and (job / "train.log").exists()
    for job in jobs[:2]:
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
        assert [r["step"] for r in read_jsonl(job / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
        assert (job / "plots/loss.png").read_bytes()[:4] == b"\x89PNG" and (job / "adapter/adapter_config.json").exists()


def test_diverging_job_is_stopped_by_the_watchdog_and_the_sweep_goes_on(sweep):
    sweep_dir, res = sweep
    job = job_dirs(sweep_dir)[2]
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "the training loss is nan at step 2" in summary["error"] and "lower method.learning_rate" in summary["error"]
    assert (job / "checkpoints/checkpoint-2/trainer_state.json").exists()  # the watchdog saves a checkpoint
    assert not (job / "adapter").exists()  # no final save of a diverged model
    losses = [r["loss"] for r in read_jsonl(job / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])  # the NaN is logged, not averaged away


def test_sweep_summary_table(sweep):
    sweep_dir, _ = sweep
    jobs = job_dirs(sweep_dir)
    with open(sweep_dir / "sweep_summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["method.learning_rate"] for r in rows] == list(LEARNING_RATES)  # only the varying override is a column
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    for row, job in zip(rows[:2], jobs):
        summary = json.loads((job / "summary.json").read_text())
        assert float(row["train_loss"]) == pytest.approx(summary["train_loss"])
        assert float(row["eval_loss"]) == pytest.approx(summary["eval_loss"])
        assert float(row["wall_time_s"]) == pytest.approx(summary["wall_time_s"]) and row["steps"] == "4"
    best = min(rows[:2], key=lambda r: float(r["eval_loss"]))
    assert [r["job"] for r in rows if r["best"] == "*"] == [best["job"]]
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "| job | method.learning_rate | status | steps | train_loss | eval_loss | wall_time_s | best |" in md
    assert "common overrides: `model=tiny debug=smoke" in md and "Failed jobs: 2" in md
    assert f"Best job: {best['job']} (method.learning_rate={best['method.learning_rate']})" in md
    assert (sweep_dir / "sweep_loss.png").read_bytes()[:4] == b"\x89PNG" and "![loss curves of the jobs](sweep_loss.png)" in md


def test_tensorboard_gets_the_metrics_rows(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = job_dirs(sweep[0])[0]
    events = EventAccumulator(str(job / "tensorboard"))
    events.Reload()
    rows = read_jsonl(job / "metrics.jsonl")
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(r["step"], round(r["loss"], 4)) for r in rows if "loss" in r]
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 4]
    assert events.Scalars("summary/eval_loss")[0].value == pytest.approx(json.loads((job / "summary.json").read_text())["eval_loss"])


def test_compare_two_runs_lists_the_differing_keys(sweep, tmp_path):
    jobs = job_dirs(sweep[0])
    res = launch("mode=compare", f"run=['{jobs[0]}','{jobs[1]}']", f"compare.output={tmp_path}")  # quoted: job names hold '=' and ','

    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "comparison.md").read_text()
    header = "| run | method.learning_rate | status | steps | train_loss | eval_loss | wall_time_s |"
    assert header in res.stdout and header in md
    assert "Config keys that differ: `method.learning_rate`;" in md  # the only key that differs between the two jobs
    evals = {j.name: json.loads((j / "summary.json").read_text())["eval_loss"] for j in jobs[:2]}
    table_rows = [line for line in md.splitlines() if line.startswith(("| 0-", "| 1-"))]
    assert [line.split(" | ")[0][2:] for line in table_rows] == sorted(evals, key=evals.get)  # sorted by eval_loss, lowest first
    assert (tmp_path / "comparison_loss.png").read_bytes()[:4] == b"\x89PNG"


def compare_cfg(run, **compare):
    from omegaconf import OmegaConf

    return OmegaConf.create({"run": run, "paths": {"output_dir": "/nonexistent"},
                             "compare": {"sort_by": "eval_loss", "descending": False, "output": None, **compare}})


def test_compare_a_whole_sweep_sorted_by_a_metric(sweep, capsys):
    from medgpt.tracking.compare import compare

    sweep_dir, _ = sweep
    result = compare(compare_cfg(str(sweep_dir), sort_by="train_loss", descending=True), sweep_dir)
    assert result["runs"] == 3 and result["differing_keys"] == ["method.learning_rate"]
    lines = [line for line in (sweep_dir / "comparison.md").read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(lines) == 3 and "failed" in lines[2]  # the diverged job has no train loss: last
    train = [float(line.split(" | ")[4]) for line in lines[:2]]
    assert train == sorted(train, reverse=True) and lines[0] in capsys.readouterr().out


@pytest.mark.parametrize("run,sort_by,message", [
    ("one", "eval_loss", "compare needs at least two"),
    ("sweep", "lora.alpha", "compare.sort_by=lora.alpha is neither a metric nor a differing config key"),
    ("/nonexistent/runs", "eval_loss", "is not a directory"),
])
def test_compare_refusals_are_one_sentence(sweep, run, sort_by, message):
    from medgpt.errors import ConfigError
    from medgpt.tracking.compare import compare

    path = {"one": str(job_dirs(sweep[0])[0]), "sweep": str(sweep[0])}.get(run, run)
    with pytest.raises(ConfigError, match=message):
        compare(compare_cfg(path, sort_by=sort_by), sweep[0])


def compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from medgpt.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg


def test_slurm_launcher_preset_composes():
    launcher = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.max_num_timeout) == ("gpu", 1, 0)


def test_lr_rank_search_space():
    cfg = compose_with_hydra(["sweep=lr_rank", "sweep.direction=maximize"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert dict(sweeper.params) == {"method.learning_rate": "tag(log, interval(1e-5, 1e-3))", "lora.r": "choice(4, 8, 16, 32)"}
    assert sweeper.direction == "maximize" and sweeper.n_trials == 4 and sweeper.sampler.seed == cfg.seed
