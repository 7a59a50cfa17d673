"""mode=preview: each method's data as training builds it, trained tokens highlighted, counts, a length histogram —
from the tokenizer alone (in-process, tiny model's tokenizer; loading a model fails the test)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, compose, dialogue, write_jsonl

from medgpt import registry
from medgpt.config import validate
from medgpt.data.templates import load_template
from medgpt.data.tokenize import IGNORE, encode_dialogue
from medgpt.errors import ConfigError
from medgpt.stages.preview import TRAINED_STYLE, highlight


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Any attempt to load weights fails the test: preview needs the tokenizer only."""
    import transformers

    import medgpt.modeling.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("mode=preview loaded a model")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def run_preview(tmp_path, *overrides):
    cfg = compose(["mode=preview", "model=tiny", f"paths.root={ROOT}", *overrides])
    validate(cfg)
    summary = registry.get("preview", "mode")(cfg, tmp_path)
    assert summary == json.loads((tmp_path / "preview" / "summary.json").read_text())
    assert (tmp_path / "preview" / "length_hist.png").read_bytes()[:4] == b"\x89PNG"
    return summary


def test_sft_counts_truncation_skips_and_tokens(tmp_path, capsys, tokenizer):
    rows = [dialogue(i) for i in range(5)] + [dialogue(5, turns=6), "{not json"]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", [dialogue(9), dialogue(10)])
    summary = run_preview(tmp_path, "method=sft", f"data.train_files=[{data}]", f"data.eval_files=[{held}]", "data.on_error=skip",
                          "method.max_length=96", "template=chatml")
    train = summary["splits"]["train"]
    assert summary["skipped_records"] == 1 and summary["splits"]["eval"]["rows"] == 2 and summary["template"] == "chatml"
    assert train["rows"] == train["examples"] == 6 and train["truncated"] == 1  # the six-turn dialogue lost turns
    chatml = load_template("chatml")
    encoded = [encode_dialogue([{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                                for t in r["conversations"]], chatml, tokenizer, 96) for r in rows[:6]]
    assert train["tokens_total"] == sum(len(e.input_ids) for e in encoded) and train["longest"] <= 96
    assert train["trained_tokens_total"] == sum(sum(1 for t in e.labels if t != IGNORE) for e in encoded)
    out = capsys.readouterr().out
    assert "train example 0" in out and "train example 3" not in out and "Answer 0.0: yes" in out and "length_hist.png" in out


def test_highlight_marks_exactly_the_trained_tokens(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "Rest."},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Drink water."}]
    enc = encode_dialogue(msgs, load_template("chatml"), tokenizer, 256)
    text = highlight(enc.input_ids, enc.labels, tokenizer)
    trained = [text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED_STYLE]
    assert trained == ["Rest.<|im_end|>", "Drink water.<|im_end|>"]
    assert text.plain == tokenizer.decode(enc.input_ids)


@pytest.mark.parametrize("method,sequences_per_row", [("pt", 1), ("dpo", 2), ("kto", 1), ("rm", 2), ("grpo", 1)])
def test_every_method_previews_its_own_data(tmp_path, capsys, method, sequences_per_row):
    summary = run_preview(tmp_path, f"method={method}", "data.max_samples=12")
    train = summary["splits"]["train"]
    assert summary["method"] == method and train["rows"] > 0 and train["sequences"] == sequences_per_row * train["rows"]
    assert train["tokens_total"] > 0 and train["longest"] <= summary["max_length"]
    trained = train["trained_tokens_total"]
    assert (trained == 0) if method == "grpo" else (0 < trained <= train["tokens_total"])  # GRPO trains generated completions
    assert "train example 0" in capsys.readouterr().out


def test_pipeline_is_refused_in_one_sentence(tmp_path):
    cfg = compose(["mode=preview", "model=tiny", "method=pipeline"])
    with pytest.raises(ConfigError, match="mode=preview shows one training method's data; method=pipeline"):
        registry.get("preview", "mode")(cfg, tmp_path)
    assert not (tmp_path / "preview").exists()


@pytest.mark.slow
def test_launch_py_mode_preview_writes_into_the_hydra_run_dir(tmp_path):
    from conftest import launch

    res = launch("mode=preview", "model=tiny", "method=sft", "data.max_samples=8", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "preview" / "length_hist.png").stat().st_size > 0 and "train example 0" in res.stdout
    summary = json.loads((tmp_path / "run" / "preview" / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["splits"]["train"]["rows"] == 8
    bad = launch("mode=preview", "model=tiny", "method=pipeline", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: mode=preview shows one training method's data")
