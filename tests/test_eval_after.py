"""Before/after and evaluation everywhere: the exact McNemar / sign test on known tables, eval.baseline on a finished
run, a tiny training run that evaluates itself (eval.after: summary keys, TensorBoard, sweep objective, compare
columns), the refusals before training, rank 0 only, and the pipeline's stage-by-stage table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, compose, launch, read_jsonl, write_jsonl
from omegaconf import OmegaConf
from test_eval import consistent, eval_cfg, fake_run, mcq_file

from medgpt.errors import ConfigError, DataError
from medgpt.evaluation import after, mcq
from medgpt.evaluation.baseline import compare_rows
from medgpt.evaluation.modes import evaluate
from medgpt.evaluation.stages import format_stage_table, stage_table
from medgpt.evaluation.stats import mcnemar_exact, paired
from medgpt.tracking.rundir import read_json, write_json

# --- paired tests on known tables -------------------------------------------------------------------------------------


def test_mcnemar_exact_on_known_tables():
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5) == mcnemar_exact(2, 10)  # 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32) and mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_counts_only_shared_questions():
    before = {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 1.0, "x": 1.0}
    after_ = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0, "e": 1.0, "y": 0.0}
    t = paired(before, after_, binary=True)
    assert (t["n"], t["worse"], t["better"], t["test"]) == (5, 1, 2, "mcnemar_exact")
    assert t["before"] == 0.6 and t["after"] == 0.8 and t["difference"] == pytest.approx(0.2) and t["p_value"] == 1.0
    assert paired({"a": 0.2, "b": 0.5}, {"a": 0.3, "b": None}, binary=False)["n"] == 1


def test_compare_rows_reports_the_baseline_and_mcnemar():
    before_rows = [{"id": str(i), "correct": i < 12} for i in range(20)]  # 12 right
    after_rows = [{"id": str(i), "correct": 2 <= i < 12 or 12 <= i < 14} for i in range(20)]  # 2 lost, 2 gained
    out = compare_rows(mcq, {"accuracy": 0.6, "n": 20, "model": "base"}, before_rows, after_rows)
    assert out["paired"]["worse"] == 2 and out["paired"]["better"] == 2 and out["paired"]["p_value"] == 1.0
    assert out["baseline"] == {"model": "base", "n": 20, "accuracy": 0.6} and "McNemar p = 1.0000" in out["paired_text"]


# --- eval.baseline on a finished run -------------------------------------------------------------------------------


def test_baseline_evaluates_the_starting_model_beside_the_run(tmp_path, tiny_path):
    run = fake_run(tmp_path, tiny_path)  # its model/ holds the tiny model's own weights: nothing changed
    files = f"eval.files=[{mcq_file(tmp_path / 'q.jsonl')}]"
    res = evaluate(eval_cfg(f"run={run}", files, "eval.baseline=true"), tmp_path / "log")
    folder = run / "eval" / res["folder"]
    base_res, base_rows = consistent(folder / "baseline")
    own_res, own_rows = consistent(folder)
    assert base_res["weights"] == "baseline" and base_res["model"] == "tiny" and own_res["weights"] == "model"
    assert [r["predicted"] for r in base_rows] == [r["predicted"] for r in own_rows]  # the same weights answer alike
    assert own_res["paired"] == {"n": 6, "before": base_res["accuracy"], "after": own_res["accuracy"], "difference": 0.0,
                                 "test": "mcnemar_exact", "worse": 0, "better": 0, "p_value": 1.0}
    assert own_res["baseline"]["accuracy"] == base_res["accuracy"]
    summary = read_json(run / "summary.json")
    assert "eval/mcq/p_value" not in summary  # other files than the suite's defaults: no summary keys
    with pytest.raises(ConfigError, match="eval.baseline=true compares a trained run with its starting model: pass run="):
        evaluate(eval_cfg(files, "eval.baseline=true"), tmp_path / "bare")


# --- eval.after: checks before training, rank 0 only -----------------------------------------------------------------


def test_eval_after_is_checked_before_training(tmp_path):
    def cfg(*o):
        return compose(["model=tiny", f"paths.root={ROOT}", *o])

    after.check(cfg())  # nothing asked: nothing checked
    after.check(cfg("eval.after=[mcq,generation]"))
    with pytest.raises(ConfigError, match=r"^eval.after=\['mcq', 'nope'\]: nope is not a suite \(suites: mcq, generation, judge\)"):
        after.check(cfg("eval.after=[mcq,nope]"))
    with pytest.raises(ConfigError, match=r"^eval\.batch_size=0 is invalid"):
        after.check(cfg("eval.after=[mcq]", "eval.batch_size=0"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "Z"}])
    with pytest.raises(DataError, match="bad.jsonl:1: answer 'Z'"):
        after.check(cfg("eval.after=[mcq]", f"eval.files=[{bad}]"))
    with pytest.raises(ConfigError, match=r"^pipeline.eval=\['bogus'\]: bogus is not a suite"):
        after.check(cfg("method=pipeline", "pipeline.eval=[bogus]"))
    with pytest.raises(ConfigError, match="method=rm trains a reward model"):
        after.check(cfg("method=rm", "eval.after=[mcq]"))
    # other suites of the list take the command's limit and batch size, and their own files
    gen = after.suite_cfg(cfg("eval.after=[mcq,generation]", "eval.limit=3", "eval.shots=1"), "generation")
    assert gen.eval.name == "generation" and gen.eval.limit == 3 and gen.eval.files == ["data/eval/medical_eval_en.jsonl"]
    # as users see it: exit 1, one sentence, no run directory
    res = launch("model=tiny", "debug=smoke", "eval.after=[nope]", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: eval.after=['nope']: nope is not a suite")
    assert not (tmp_path / "run").exists()


def test_only_rank_0_evaluates_after_training(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(after, "evaluate_run", lambda *a, **k: pytest.fail("rank 1 must not evaluate"))
    summary = {"status": "completed", "stage": "sft"}
    assert after.after_training(compose(["eval.after=[mcq]"]), None, summary) is summary


# --- a tiny run that evaluates itself ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("after") / "run"
    res = launch("model=tiny", "debug=smoke", "logger=tensorboard", "eval=generation", "eval.max_new_tokens=4",
                 "eval.after=[mcq,generation]", "eval.limit=4",
                 "sweep.metric=eval/mcq/accuracy", "sweep.direction=maximize", f"hydra.run.dir={run}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run / "stdout.txt").write_text(res.stdout)
    return run


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_a_training_run_evaluates_itself(evaluated_run):
    summary = read_json(evaluated_run / "summary.json")
    assert summary["status"] == "completed"
    folders = {p.name.split("-")[0]: p for p in (evaluated_run / "eval").iterdir()}
    res, rows = consistent(folders["mcq"])  # eval.limit=4: a folder of its own, its keys still in summary.json
    assert len(rows) == 4 and summary["eval/mcq/n"] == 4 and summary["eval/mcq/accuracy"] == res["accuracy"]
    assert summary["eval/mcq/ci95_lo"] == res["ci95"][0] and summary["eval/mcq/ci95_hi"] == res["ci95"][1]
    gen = read_json(folders["generation"] / "results.json")
    assert gen["n"] == 4 and summary["eval/generation/rougeL"] == gen["rougeL"] and summary["eval/generation/n"] == 4
    assert len(read_jsonl(folders["generation"] / "predictions.jsonl")) == 4
    assert OmegaConf.load(evaluated_run / "config.yaml").eval.after == ["mcq", "generation"]


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_eval_after_reaches_tensorboard(evaluated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(evaluated_run / "tensorboard"))
    events.Reload()
    summary = read_json(evaluated_run / "summary.json")
    value = events.Scalars("summary/eval/mcq/accuracy")[-1].value
    assert value == pytest.approx(summary["eval/mcq/accuracy"]) and "summary/eval/generation/rougeL" in events.Tags()["scalars"]


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_eval_keys_are_a_sweep_objective_and_compare_columns(evaluated_run, tmp_path, tiny_path):
    from medgpt.run import _sweep_metric
    from medgpt.tracking.compare import comparison
    from medgpt.tracking.runs import load_run
    from medgpt.tracking.sweep import best_job

    summary = read_json(evaluated_run / "summary.json")
    cfg = compose(["sweep.metric=eval/mcq/accuracy", "sweep.direction=maximize"])
    assert _sweep_metric(cfg, summary) == summary["eval/mcq/accuracy"]
    other = fake_run(tmp_path, tiny_path)  # a second run with a known, better accuracy
    write_json(other / "summary.json", {"status": "completed", "version": 2, "eval/mcq/accuracy": 2.0, "eval/mcq/n": 4})
    runs = [load_run(evaluated_run), load_run(other)]
    assert best_job(runs, "eval/mcq/accuracy", "maximize").path == other
    assert best_job(runs, "eval/mcq/accuracy", "minimize").path == evaluated_run
    headers, rows, _ = comparison(runs, tmp_path, "eval/mcq/accuracy", True)
    assert headers[-2:] == ["eval/generation/rougeL", "eval/mcq/accuracy"]
    assert [r[-1] for r in rows] == [2.0, summary["eval/mcq/accuracy"]] and rows[1][-2] == summary["eval/generation/rougeL"]
    assert rows[0][-2] is None


# --- the pipeline's stage-by-stage table ---------------------------------------------------------------------------


def test_stage_table_rows_and_paired_tests(tmp_path):
    def results(name: str, correct: list[bool], **extra) -> dict:
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"id": str(i), "correct": c} for i, c in enumerate(correct)])
        return {"accuracy": sum(correct) / len(correct), "predictions": str(path), **extra}

    start = [True] * 2 + [False] * 10
    pt = [False] * 2 + [True] * 10  # 2 lost, 10 gained: p = 2 * 79 / 4096
    sft = pt
    first = results("pt", pt, baseline={"accuracy": 2 / 12}, paired=paired(dict(enumerate(map(float, start))),
                                                                            dict(enumerate(map(float, pt))), True))
    rows = stage_table([("pt", {"mcq": first}), ("sft", {"mcq": results("sft", sft)})])
    assert [r["stage"] for r in rows] == ["start", "pt", "sft"]
    assert rows[0] == {"stage": "start", "eval/mcq/accuracy": 2 / 12}
    assert rows[1]["eval/mcq/accuracy"] == 10 / 12 and rows[1]["eval/mcq/p_value"] == pytest.approx(0.0386, abs=5e-5)
    assert rows[2]["eval/mcq/difference"] == 0.0 and rows[2]["eval/mcq/p_value"] == 1.0
    text = format_stage_table(rows)
    assert "start   0.167" in text and "pt      0.833 (+0.667, p=0.039)" in text


@pytest.mark.slow
def test_pipeline_evaluates_every_stage(tmp_path):
    run = tmp_path / "pipe"
    res = launch("experiment=medical_pipeline", "pipeline.stages=[pt,sft]", "model=tiny", "debug=smoke", "pipeline.eval=[mcq]",
                 "eval.limit=6", f"hydra.run.dir={run}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = read_json(run / "summary.json")
    table = summary["eval_stages"]
    assert [r["stage"] for r in table] == ["start", "pt", "sft"]
    for row, stage_dir in zip(table[1:], sorted(p for p in run.iterdir() if p.is_dir() and p.name[0].isdigit())):
        stage_res = read_json(next((stage_dir / "eval").glob("mcq*/results.json")))
        assert row["eval/mcq/accuracy"] == stage_res["accuracy"] == read_json(stage_dir / "summary.json")["eval/mcq/accuracy"]
    start = read_json(next((run / "1-pt" / "eval").glob("mcq*/baseline/results.json")))
    assert table[0]["eval/mcq/accuracy"] == start["accuracy"] and summary["eval/mcq/accuracy"] == table[-1]["eval/mcq/accuracy"]
    assert "pipeline evaluation, stage by stage" in res.stdout and json.dumps(table)
