"""Merging with a parity report, model.init_from, and the PT -> SFT -> DPO pipeline on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import dialogue, launch, write_jsonl


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipeline") / "run"
    # fp32 (hardware=auto is bf16 on CPUs with avx512_bf16, and merges in the dtype the run trained in): parity to 1e-4
    res = launch("experiment=medical_pipeline", "model=tiny", "debug=smoke", "hardware=cpu", f"hydra.run.dir={run}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_pipeline_stages_chain_and_report(pipeline_run):
    s = json.loads((pipeline_run / "summary.json").read_text())
    assert s["status"] == "completed" and [r["stage"] for r in s["stages"]] == ["pt", "sft", "dpo"]
    assert all(r["eval_loss"] is not None for r in s["stages"])  # held-out eval loss after each stage
    for i, stage in enumerate(["pt", "sft", "dpo"], 1):
        d = pipeline_run / f"{i}-{stage}"
        assert json.loads((d / "summary.json").read_text())["status"] == "completed"
        assert (d / "metrics.jsonl").exists() and (d / "plots/loss.png").exists() and (d / "train.log").stat().st_size > 0
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["method"]["name"] == stage and cfg["method"]["max_steps"] == 8  # debug=smoke reached every stage
        assert cfg["model"]["init_from"] == (str(pipeline_run / f"{i - 1}-{['pt', 'sft'][i - 2]}") if i > 1 else None)
    dpo = json.loads((pipeline_run / "3-dpo/summary.json").read_text())
    assert dpo["reference"]["kind"] == "adapter-disabled" and "2-sft" in dpo["reference"]["description"]
    assert dpo["base_model_path"] == str(pipeline_run / "2-sft/merged")
    assert s["merged"] == str(pipeline_run / "3-dpo/merged")


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_merge_report_shows_parity(pipeline_run):
    report = json.loads((pipeline_run / "3-dpo/merged/merge_report.json").read_text())
    assert report["greedy_equal"] is True and report["max_logit_diff"] < 1e-4 and len(report["prompts"]) == 3
    merged = pipeline_run / "3-dpo/merged"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "medgpt_template.yaml"):
        assert (merged / name).exists(), name
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    card = (merged / "README.md").read_text()  # the model card: what it is, from what, and not medical advice
    assert card.startswith("# 3-dpo (merged: ") and "mode=merge run=<run>" in card and "Method: dpo" in card
    assert "round trip verified: True" in card and "Not medical advice" in card


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_merge_mode_and_its_refusal(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [dialogue(i) for i in range(12)])
    common = ["model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.2"]
    assert launch(*common, f"hydra.run.dir={tmp_path / 'lora'}").returncode == 0
    res = launch("mode=merge", f"run={tmp_path / 'lora'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "lora/merged/merge_report.json").read_text())["greedy_equal"] is True
    assert launch(*common, "lora=none", f"hydra.run.dir={tmp_path / 'full'}").returncode == 0
    refused = launch("mode=merge", f"run={tmp_path / 'full'}")
    assert refused.returncode == 1 and "nothing to merge" in refused.stderr and "Traceback" not in refused.stderr
    # init_from a full fine-tune uses its model/ folder and carries its template
    res = launch(*common, f"model.init_from={tmp_path / 'full'}", "template=auto", f"hydra.run.dir={tmp_path / 'next'}")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "next/summary.json").read_text())
    assert s["base_model_path"] == str(tmp_path / "full/model") and s["template"] == "chatml"


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_merge_and_init_from_accept_a_pipeline_root(pipeline_run):
    """A pipeline's root directory stands for its last stage (run=latest often picks it)."""
    from medgpt.tracking.rundir import trained_run

    assert trained_run(pipeline_run) == pipeline_run / "3-dpo"
    res = launch("mode=merge", f"run={pipeline_run}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3-dpo" in res.stdout
