"""End to end through launch.py on the tiny model: the run directory, caching, bad input, learning."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import dialogue, launch, read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [dialogue(i, turns=1 + i % 3, system="You are careful." if i % 4 == 0 else None) for i in range(40)]
    return write_jsonl(folder / "train.jsonl", rows)


def sft(run_dir, data_file, *extra, **kw):
    return launch("model=tiny", "method=sft", "debug=smoke", f"data.train_files=[{data_file}]", "data.eval_files=[]",
                  "data.eval_split=0.2", f"hydra.run.dir={run_dir}", *extra, **kw)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    res = sft(run_dir, data_file)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, res


def test_run_directory_layout(smoke_run):
    run_dir, _ = smoke_run
    for name in ("config.yaml", "overrides.txt", "env.json", "metrics.jsonl", "summary.json", "plots/loss.png", "train.log",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "plots/loss.png").read_bytes()[:4] == b"\x89PNG"


def test_config_overrides_and_env(smoke_run):
    run_dir, _ = smoke_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["name"] == "tiny" and cfg["method"]["max_steps"] == 8 and "${" not in (run_dir / "config.yaml").read_text()
    assert "model=tiny" in (run_dir / "overrides.txt").read_text().splitlines()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["libraries"]["transformers"].startswith("5.") and "commit" in env["git"] and "dirty" in env["git"]


def test_metrics_rows(smoke_run):
    run_dir, _ = smoke_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))  # a row per optimiser step (logging_steps=1)
    for r in train:
        assert {"epoch", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mem_gb"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["loss"] > 0
    assert [r["step"] for r in evals] == [0, 8]  # before and after training
    assert all(abs(r["eval_perplexity"] - 2.718281828 ** r["eval_loss"]) / r["eval_perplexity"] < 1e-3 for r in evals)


def test_summary(smoke_run):
    run_dir, res = smoke_run
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 8 and s["template"] == "chatml"
    assert s["eval_loss"] == pytest.approx(read_jsonl(run_dir / "metrics.jsonl")[-1]["eval_loss"], rel=1e-5)
    assert s["eval_loss_before"] > 0 and s["tokens_seen"] > 0 and s["data"]["train"]["examples"] == 26
    assert s["data"]["eval"]["examples"] == 6
    assert len(s["samples"]) == 1 and {"question", "reference", "before", "after"} <= set(s["samples"][0])
    assert str(run_dir) in res.stdout


def test_saved_chat_template_is_the_training_template(smoke_run):
    from transformers import AutoTokenizer

    from medgpt.data.templates import load_template

    run_dir, _ = smoke_run
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    conv = [{"role": "user", "content": "Hi"}]
    expected = load_template("chatml").render(conv, add_generation_prompt=True)
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == expected


def test_second_run_hits_the_tokenised_data_cache(smoke_run, data_file, tmp_path):
    run_dir, _ = smoke_run
    res = sft(tmp_path / "again", data_file)
    assert res.returncode == 0, res.stderr[-2000:]
    first, second = (json.loads((d / "summary.json").read_text()) for d in (run_dir, tmp_path / "again"))
    assert second["data"]["cache_hit"] is True and "cache hit" in res.stdout
    assert second["eval_loss_before"] == pytest.approx(first["eval_loss_before"], rel=1e-6)


def test_malformed_line_fails_cleanly(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [dialogue(0), dialogue(1), '{"conversations": [oops'])
    res = sft(tmp_path / "run", bad)
    assert res.returncode == 1
    assert f"{bad}:3: invalid JSON" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "bad.jsonl:3" in summary["error"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_skip_mode_drops_and_counts(tmp_path):
    rows = [dialogue(i) for i in range(20)] + ['{"broken', {"conversations": [{"from": "alien", "value": "x"}]}]
    res = sft(tmp_path / "run", write_jsonl(tmp_path / "mixed.jsonl", rows), "data.on_error=skip")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["skipped"] == 2


@pytest.mark.parametrize("path,message", [
    ("/nonexistent/model", "does not exist"),
    ("medgpt-tests/never-downloaded-model", "hub cannot be reached"),  # a Hub id no cache holds: no private HF_HOME (and child process) needed
])
def test_missing_model_is_one_sentence(tmp_path, data_file, path, message):
    res = sft(tmp_path / "run", data_file, f"model.name_or_path={path}", env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 1 and message in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_full_finetune_with_packing_saves_a_model(tmp_path, data_file):
    res = sft(tmp_path / "run", data_file, "lora=none", "method.packing=true", "method.learning_rate=1e-3", "method.max_steps=2",
              "method.sample_questions=0")  # what is saved, not how well it trained
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["artefact"] == "model" and s["data"]["train"]["packed_rows"] < s["data"]["train"]["examples"]
    assert (tmp_path / "run/model/model.safetensors").exists() and (tmp_path / "run/model/chat_template.jinja").exists()
    gen = json.loads((tmp_path / "run/model/generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])  # <|im_end|>


def test_overfits_a_small_repeated_set(tmp_path):
    """A few dialogues seen again and again: the training loss must fall clearly within 20 steps."""
    rows = [dialogue(i) for i in range(4)]
    res = launch("model=tiny", "lora=none", f"data.train_files=[{write_jsonl(tmp_path / 'four.jsonl', rows)}]",
                 "data.eval_files=[]", "method.max_steps=20", "method.learning_rate=5e-3", "method.warmup_ratio=0",
                 "method.lr_scheduler=constant", "method.sample_questions=0", "hardware.batch_size=4",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-2000:]
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert len(losses) == 20
    assert losses[-1] < 0.3 * losses[0], losses  # measured: 10.80 -> 2.63 (0.24 of the start)
