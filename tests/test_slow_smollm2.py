"""End to end on the embedded SmolLM2-135M (minutes on 2 CPU cores): `pytest -m slow`."""

from __future__ import annotations

import json

import pytest
from conftest import launch

pytestmark = pytest.mark.slow


def test_sft_on_smollm2_lowers_held_out_loss(tmp_path):
    res = launch("model=smollm2-135m", "debug=smoke", "method.learning_rate=1e-3", "data.max_samples=48",
                 f"hydra.run.dir={tmp_path}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["template"] == "smollm2" and s["status"] == "completed"
    assert s["eval_loss"] < s["eval_loss_before"]
    assert s["samples"][0]["before"] and s["samples"][0]["after"]  # a real model answers in words


def test_auto_template_recognises_smollm2(tmp_path):
    import os
    from pathlib import Path

    from medgpt.data.templates import identify_template
    from medgpt.modeling.loader import load_tokenizer, resolve_model_path

    cache = os.environ.get("MEDGPT_CACHE", str(Path.home() / ".cache" / "medgpt"))
    tok = load_tokenizer(resolve_model_path("smollm2-135m", cache))
    assert identify_template(tok).name == "smollm2"
