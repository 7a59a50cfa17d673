"""quantize=int8|nf4|fp4 for the inference modes: the tiny model served through bitsandbytes' CPU backend answers over
the OpenAI API, an adapter sits on a quantised base unmerged, and the refusals (no backend, training, merge first)."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose
from fastapi.testclient import TestClient
from test_export_support import adapter_run

from medgpt.config import validate
from medgpt.errors import ConfigError, ModelError
from medgpt.serving.api import create_app
from medgpt.serving.engine import SamplingParams
from medgpt.serving.loading import load

LAYER = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


def cfg_for(*extra):
    return compose(["mode=serve", "model=tiny", "generation.temperature=0", f"paths.root={ROOT}", "serve.max_batch_size=2", *extra])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_tiny_model_answers_over_the_api(kind):
    cfg = cfg_for(f"quantize={kind}", "generation.max_new_tokens=6")
    validate(cfg)
    loaded = load(cfg)
    try:
        model = loaded.engine.model
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == LAYER[kind]
        assert model.get_memory_footprint() < 12_700_000  # fp32: 14.6 MB; the quantised layers shrink it
        client = TestClient(create_app(loaded, cfg.generation))
        res = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Is 38.5 C a fever?"}], "max_tokens": 6,
                                                         "temperature": 0})
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and 1 <= body["usage"]["completion_tokens"] <= 6
        # the engine's batched decoding gives what transformers' own greedy generate gives on the same quantised model
        ids = loaded.chat_ids([{"role": "user", "content": "Is 38.5 C a fever?"}])
        import torch

        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=6,
                             do_sample=False, eos_token_id=loaded.stop_ids, pad_token_id=loaded.tokenizer.pad_token_id)
        ref_ids = [t for t in ref[0, len(ids):].tolist() if t not in loaded.stop_ids]
        got = loaded.engine.generate([ids], SamplingParams(max_tokens=6, temperature=0))[0]
        assert got.text == loaded.tokenizer.decode(ref_ids, skip_special_tokens=True)
    finally:
        loaded.engine.close()


def test_adapter_sits_unmerged_on_the_quantised_base(tmp_path, tiny_path):
    run = adapter_run(tmp_path, tiny_path, "sft-a", seed=3)
    loaded = load(cfg_for(f"run={run}", "quantize=nf4"))
    try:
        layer = loaded.engine.model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer.base_layer).__name__ == "Linear4bit" and "default" in layer.lora_A
        assert "adapter" in loaded.describe("serve") and loaded.artefacts.adapter_path == str(run / "adapter")
    finally:
        loaded.engine.close()


def test_an_adapter_that_cannot_sit_on_a_quantised_base_says_merge_first(tmp_path, tiny_path, monkeypatch):
    import peft

    run = adapter_run(tmp_path, tiny_path, "sft-b", seed=4)

    def refuse(*args, **kwargs):
        raise ValueError("Target module Linear4bit is not supported")  # what PEFT raises for a layer type it cannot wrap

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    with pytest.raises(ModelError, match=rf"cannot be applied to the nf4-quantised base .*merge it first \(mode=merge run={run}\)"):
        load(cfg_for(f"run={run}", "quantize=nf4"))


def test_quantising_on_a_backend_bitsandbytes_lacks(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda", "xpu"}, raising=False)
    with pytest.raises(ConfigError, match=r"^quantize=int8: bitsandbytes \S+ has no cpu backend \(it has: cuda, xpu\); use"):
        load(cfg_for("quantize=int8", "hardware=cpu"))


def test_quantize_is_refused_for_training_and_checked_for_values():
    with pytest.raises(ConfigError, match="quantize=nf4 is for the inference modes .* use lora=qlora"):
        validate(compose(["model=tiny", "quantize=nf4"]))
    with pytest.raises(ConfigError, match="quantize='int4' is not one of none, int8, nf4, fp4"):
        validate(cfg_for("quantize=int4"))
