"""What the inference modes load from a run directory: merged/ > model/ > base + adapter/, its template, run=latest, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket

import pytest
import torch
from conftest import ROOT, compose
from test_serving_support import tiny_run

from medgpt.errors import ConfigError
from medgpt.serving.loading import load, resolve_artefacts


@pytest.fixture()
def run_copy(tmp_path):
    dst = tmp_path / "outputs" / "2026-01-01" / "run"
    shutil.copytree(tiny_run(), dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def cfg_for(run, *extra):
    return compose(["model=tiny", f"run={run}", f"paths.root={ROOT}", *extra])


def test_artefact_preference_and_template(run_copy, tiny_path):
    a = resolve_artefacts(cfg_for(run_copy))
    summary = json.loads((run_copy / "summary.json").read_text())
    assert (a.weights, a.adapter_path, a.model_path) == ("adapter", str(run_copy / "adapter"), summary["base_model_path"])
    assert a.tokenizer_path == str(run_copy / "adapter") and a.name == "run"
    assert (a.template.name, a.template_source) == ("chatml", "adapter/medgpt_template.yaml")
    for folder in ("model", "merged"):  # a full model beats the adapter; a merged model beats both
        shutil.copytree(tiny_path, run_copy / folder)
        shutil.copy(run_copy / "adapter" / "medgpt_template.yaml", run_copy / folder)
        a = resolve_artefacts(cfg_for(run_copy))
        assert (a.weights, a.model_path, a.adapter_path, a.tokenizer_path) == (folder, str(run_copy / folder), None, str(run_copy / folder))
        assert a.template_source == f"{folder}/medgpt_template.yaml"
    assert resolve_artefacts(cfg_for(run_copy, "template=llama3")).template.name == "llama3"  # the command line wins


def test_a_pipeline_root_serves_its_last_stage(run_copy, tmp_path):
    root = tmp_path / "pipeline"
    root.mkdir()
    shutil.copy(run_copy / "config.yaml", root)
    (root / "summary.json").write_text(json.dumps({"status": "completed", "final_run": str(run_copy)}))
    a = resolve_artefacts(cfg_for(root))
    assert a.run_dir == run_copy.resolve() and a.weights == "adapter"


def test_run_latest_and_missing_runs(run_copy, tmp_path):
    a = resolve_artefacts(cfg_for("latest", f"paths.output_dir={run_copy.parents[1]}", "serve.model_name=medic"))
    assert a.run_dir == run_copy.resolve() and a.name == "medic"
    with pytest.raises(ConfigError, match="no completed run"):
        resolve_artefacts(cfg_for("latest", f"paths.output_dir={tmp_path / 'empty'}"))
    shutil.rmtree(run_copy / "adapter")
    with pytest.raises(Exception, match="no merged/, model/ or adapter/"):
        resolve_artefacts(cfg_for(run_copy))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft touches a deprecated transformers property
def test_adapter_merged_in_memory_answers_like_the_peft_model(run_copy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = load(cfg_for(run_copy, "generation.temperature=0"))
    try:
        ids = loaded.chat_ids([{"role": "user", "content": "Is 38.5 C a fever?"}])
        from medgpt.serving.engine import SamplingParams

        got = loaded.engine.generate([ids], SamplingParams(max_tokens=10, temperature=0))[0]
        base = AutoModelForCausalLM.from_pretrained(loaded.artefacts.model_path, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, loaded.artefacts.adapter_path).eval()
        out = peft.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=10,
                            do_sample=False, eos_token_id=loaded.stop_ids, pad_token_id=loaded.tokenizer.pad_token_id)
        ref = [t for t in out[0, len(ids):].tolist() if t not in loaded.stop_ids]
        assert got.text == loaded.tokenizer.decode(ref, skip_special_tokens=True)
        assert "adapter        " + str(run_copy / "adapter") in loaded.describe("serve")
    finally:
        loaded.engine.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_without_vllm_is_one_sentence():
    with pytest.raises(ConfigError, match=r"pip install 'medgpt\[gpu\]'"):
        load(compose(["model=tiny", "serve.engine=vllm"]))
    with pytest.raises(ConfigError, match="not one of hf, vllm"):
        load(compose(["model=tiny", "serve.engine=tgi"]))


def test_api_key_from_the_environment(monkeypatch):
    from medgpt.serving.modes import api_key

    monkeypatch.delenv("MEDGPT_API_KEY", raising=False)
    assert api_key(compose(["model=tiny"])) is None
    monkeypatch.setenv("MEDGPT_API_KEY", "from-env")
    assert api_key(compose(["model=tiny"])) == "from-env"
    assert api_key(compose(["model=tiny", "serve.api_key=from-config"])) == "from-config"


def test_busy_port_is_one_sentence():
    from medgpt.serving.modes import _check_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} .*; pick a free port with serve.port=<port>"):
            _check_port("127.0.0.1", port, "serve.port")
    with pytest.raises(ConfigError, match="not a TCP port"):
        _check_port("127.0.0.1", 70000, "serve.webui_port")


def test_trust_remote_code_comes_from_the_command_never_the_run(run_copy):
    """A run directory from someone else cannot switch remote code on; the command line decides (default off)."""
    saved = (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(saved.replace("trust_remote_code: false", "trust_remote_code: true"))
    assert "trust_remote_code: true" in (run_copy / "config.yaml").read_text()
    assert resolve_artefacts(cfg_for(run_copy)).trust_remote_code is False
    assert resolve_artefacts(cfg_for(run_copy, "model.trust_remote_code=true")).trust_remote_code is True
    assert resolve_artefacts(cfg_for(run_copy, "model.trust_remote_code=false")).trust_remote_code is False
