"""mode=export: GGUF round trip (logits within tolerance, same greedy tokens, the tokenizer inside), bnb and merged
folders that transformers reloads, model cards, and the refusals (unsupported architecture, K-quants, runs that
did not complete, bitsandbytes without a backend)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import ROOT, compose
from omegaconf import OmegaConf
from test_export_support import adapter_run, full_run

from medgpt.errors import ConfigError
from medgpt.export.modes import export_run
from medgpt.export.verify import TOLERANCES


def export_cfg(**kw):
    e = compose(["mode=export", "model=tiny", f"paths.root={ROOT}"]).export
    for k, v in kw.items():
        e[k] = v
    return e


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("export")
    return {"adapter": adapter_run(root, tiny_path, "sft-adapter", seed=1), "root": root}


@pytest.fixture(scope="module")
def gguf_export(runs):
    """One q8_0 GGUF export of the adapter run (the adapter merged in memory), shared by the GGUF tests: ~40 s, most of it
    transformers' GGUF reader parsing the 49k-token vocabulary (once for the model's config, once for its weights,
    once for the tokenizer)."""
    report = export_run(runs["adapter"], export_cfg(format="gguf", gguf_type="q8_0", prompts=1, max_new_tokens=8))
    return runs["adapter"] / "export" / "gguf", report


def test_gguf_round_trip_within_tolerance_with_the_same_greedy_tokens(gguf_export):
    folder, report = gguf_export
    v = report["verification"]
    assert report["verified"] and v["passed"] and v["within_tolerance"]
    assert 0 < v["relative_logit_diff"] <= TOLERANCES["q8_0"] == v["tolerance_relative"]
    assert v["greedy_tokens_source"] == v["greedy_tokens_export"] and len(v["greedy_tokens_source"]) == 8
    assert abs(v["prompt_loss_delta"]) < 0.01
    on_disk = json.loads((folder / "export_report.json").read_text())
    assert on_disk["size_bytes"] == (folder / "sft-adapter-q8_0.gguf").stat().st_size == report["files"]["sft-adapter-q8_0.gguf"]
    assert report["gguf"]["types"] == {"Q8_0": 15, "F32": 5} and "K-quants" in report["gguf"]["k_quants"]
    assert not list(runs_hidden(folder.parents[1]))  # no scratch folder left behind
    # the tokenizer inside the GGUF, read back by AutoTokenizer(gguf_file=...), encodes like the source
    assert report["tokenizer"] == {"texts": 9, "encode_equal": True, "chat_template_equal": True, "eos_equal": True}


def runs_hidden(run):
    return (p for p in run.iterdir() if p.name.startswith(".export-"))


@pytest.mark.slow  # GGUFReader parses the vocabulary again (~10 s); the fast test checks the tokenizer read back already
def test_gguf_carries_the_tokenizer_and_chat_template(gguf_export, tokenizer):
    import gguf

    folder, report = gguf_export
    reader = gguf.GGUFReader(str(folder / "sft-adapter-q8_0.gguf"))
    fields = reader.fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.tokens"].data) == 49152 and len(fields["tokenizer.ggml.merges"].data) > 40000
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["general.architecture"].contents() == "llama"


def test_export_folders_carry_a_model_card(gguf_export):
    folder, _ = gguf_export
    card = (folder / "README.md").read_text()
    for needed in ("Base model: `tiny`", "Method: sft with lora", "medical_demo", "Not medical advice", "Held-out loss after training: 10.5000",
                   "round trip verified: True"):
        assert needed in card, needed


def test_bnb_export_reloads_as_a_quantised_model(runs, tiny_path):
    from transformers import AutoModelForCausalLM

    run = full_run(runs["root"], tiny_path)
    report = export_run(run, export_cfg(format="bnb", bnb="nf4", prompts=2, max_new_tokens=6))
    folder = run / "export" / "bnb"
    assert report["verified"] and report["type"] == "nf4" and report["size_bytes"] == (folder / "model.safetensors").stat().st_size
    reloaded = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert (folder / "tokenizer.json").exists() and (folder / "README.md").exists()
    assert report["verification"]["relative_logit_diff"] <= TOLERANCES["nf4"]


def test_merged_export_is_fp16_safetensors(runs):
    from safetensors import safe_open

    report = export_run(runs["adapter"], export_cfg(format="merged", prompts=1, max_new_tokens=4))
    folder = runs["adapter"] / "export" / "merged"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert report["type"] == "fp16" and report["verified"] and report["verification"]["relative_logit_diff"] <= TOLERANCES["fp16"]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config

    from medgpt.export.gguf_file import check_architecture

    with pytest.raises(ConfigError, match=r"supports llama \(SmolLM2, Llama 2/3\) and qwen2 \(Qwen2, Qwen2.5\) models; this model is 'gpt2'"):
        check_architecture(GPT2Config())


def test_k_quants_are_refused_with_the_reason(tmp_path, tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from medgpt.export.gguf_file import write_gguf

    with pytest.raises(ConfigError, match="cannot write K-quants"):
        write_gguf(AutoModelForCausalLM.from_pretrained(tiny_path), tokenizer, tmp_path / "x.gguf", "q4_k", "x")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("status,words", [("failed", "failed: there is no finished model"), ("running", "is still running")])
def test_runs_that_did_not_complete_are_refused(tmp_path, tiny_path, status, words):
    run = full_run(tmp_path, tiny_path, status=status)
    with pytest.raises(ConfigError, match=words):
        export_run(run, export_cfg(format="merged"))
    assert not (run / "export").exists()


def test_bnb_without_a_backend_for_the_device(monkeypatch):
    import bitsandbytes

    from medgpt.modeling.loader import require_bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    with pytest.raises(ConfigError, match=r"export.bnb=nf4: bitsandbytes .* has no cpu backend \(it has: cuda\)"):
        require_bitsandbytes("nf4", "cpu", "export.bnb")


# --- slow: the embedded SmolLM2-135M, and llama.cpp itself where it is installed ----------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    from medgpt.modeling.embedded import embedded_path

    path = embedded_path("smollm2-135m", os.environ.get("MEDGPT_CACHE", str(os.path.expanduser("~/.cache/medgpt"))))
    run = full_run(tmp_path_factory.mktemp("smollm2"), path, name="smollm2-run")
    return run, export_run(run, export_cfg(format="gguf", gguf_type="q8_0", prompts=3, max_new_tokens=12))


@pytest.mark.slow
def test_smollm2_gguf_round_trip(smollm2_gguf):
    _, report = smollm2_gguf
    v = report["verification"]
    assert report["verified"] and v["relative_logit_diff"] <= TOLERANCES["q8_0"] and v["greedy_equal"]
    assert report["tokenizer"]["encode_equal"] and report["gguf"]["types"]["Q8_0"] > 200


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed here (it builds from source; not attempted on this machine)")
def test_llama_cpp_runs_the_smollm2_gguf(smollm2_gguf):
    from llama_cpp import Llama

    run, _ = smollm2_gguf
    llm = Llama(model_path=str(run / "export" / "gguf" / "smollm2-run-q8_0.gguf"), n_ctx=512, verbose=False)
    out = llm.create_chat_completion([{"role": "user", "content": "What are the warning signs of a stroke?"}], max_tokens=12, temperature=0)
    assert out["choices"][0]["message"]["content"].strip()  # llama.cpp read the weights, the tokenizer and the chat template


def test_config_refuses_k_quant_type():
    from medgpt.config import validate

    cfg = compose(["mode=export", "export.gguf_type=q4_k_m"])
    with pytest.raises(ConfigError, match=r"export.gguf_type='q4_k_m' is not one of .*K-quants .* llama.cpp's llama-quantize\."):
        validate(cfg)
    assert OmegaConf.select(cfg, "export.format") == "gguf"
