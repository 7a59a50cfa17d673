"""RoPE scaling (model.rope_scaling / model.rope_factor, medgpt.modeling.rope): validated, applied at load, kept by the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose

from medgpt.config import validate
from medgpt.errors import ConfigError, ModelError
from medgpt.modeling.rope import apply_rope_scaling, rope_settings


def _placement():
    from medgpt.modeling.loader import Placement

    return Placement("cpu", torch.float32, "sdpa")


@pytest.fixture(scope="module")
def tiny_config(tiny_path):
    from transformers import AutoConfig

    return lambda: AutoConfig.from_pretrained(tiny_path)


@pytest.mark.parametrize("kind,max_positions,original", [("linear", 8192, None), ("yarn", 8192, 2048), ("dynamic", 2048, None)])
def test_config_carries_the_scaling(tiny_config, kind, max_positions, original):
    config = tiny_config()
    theta = config.rope_parameters["rope_theta"]
    apply_rope_scaling(config, rope_settings(compose(["model=tiny", f"model.rope_scaling={kind}", "model.rope_factor=4"]).model))
    assert config.rope_parameters["rope_type"] == kind and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["rope_theta"] == theta and config.max_position_embeddings == max_positions
    assert config.rope_parameters.get("original_max_position_embeddings") == original
    assert apply_rope_scaling(config, {"type": kind, "factor": 4.0}).max_position_embeddings == max_positions  # twice = once


def test_refusals(tiny_config):
    config = apply_rope_scaling(tiny_config(), {"type": "linear", "factor": 2.0})
    with pytest.raises(ModelError, match=r"already uses RoPE scaling 'linear' \(factor 2\.0\), which this would replace"):
        apply_rope_scaling(config, {"type": "yarn", "factor": 2.0})
    from transformers import GPT2Config

    with pytest.raises(ModelError, match=r"^model\.rope_scaling=linear: the model \(GPT2Config\) has no rotary position embedding"):
        apply_rope_scaling(GPT2Config(), {"type": "linear", "factor": 2.0})
    assert rope_settings(compose(["model=tiny"]).model) is None
    for overrides, message in [(["method=rm"], "method=rm's sequence-classification model"),
                               (["method=dpo", "method.reference=base"], r"the reference \(method\.reference=base\)")]:
        with pytest.raises(ConfigError, match=rf"^model\.rope_scaling is not applied to {message}, which loads without it"):
            validate(compose(["model=tiny", "model.rope_scaling=linear", *overrides]))
    for bad in ("model.rope_scaling=ntk", "model.rope_factor=1.0"):  # the limits (tests/test_config_values.py covers each)
        with pytest.raises(ConfigError, match=r"^model\.rope_"):
            validate(compose(["model=tiny", bad]))


@pytest.fixture(scope="module")
def long_ids():
    torch.manual_seed(0)
    return torch.randint(100, 40000, (1, 2100))  # past the tiny model's 2048 trained positions


@pytest.fixture(scope="module")
def plain_logits(tiny_path, long_ids):
    from medgpt.modeling.loader import load_model

    with torch.no_grad():
        return load_model(str(tiny_path), _placement()).eval()(input_ids=long_ids).logits


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_loaded_model_uses_it_at_long_positions(tiny_path, long_ids, plain_logits, kind):
    from medgpt.modeling.loader import load_model

    model = load_model(str(tiny_path), _placement(), rope_scaling={"type": kind, "factor": 2.0}).eval()
    assert model.config.rope_parameters["rope_type"] == kind
    with torch.no_grad():
        logits = model(input_ids=long_ids).logits
    torch.testing.assert_close(logits[:, 0], plain_logits[:, 0])  # position 0 is not rotated
    assert (logits[:, -1] - plain_logits[:, -1]).abs().max() > 1e-4  # the random tiny model's logits are ~0.1 in size
    if kind == "dynamic":  # dynamic NTK changes nothing within the trained length
        with torch.no_grad():
            short = model(input_ids=long_ids[:, :256]).logits
        torch.testing.assert_close(short, plain_logits[:, :256])
    else:
        assert (logits[:, 255] - plain_logits[:, 255]).abs().max() > 1e-3


def test_an_adapter_run_applies_it_to_its_base(tiny_path, tmp_path):
    """adapter/medgpt_base.json (written by the adapter's save, see test_vocab) is what merge and serving load the base with."""
    from medgpt.modeling.loader import load_model
    from medgpt.modeling.vocab import BASE_CHANGES, base_changes

    (tmp_path / BASE_CHANGES).write_text(json.dumps(base_changes(None, {}, {"type": "yarn", "factor": 2.0})))
    model = load_model(str(tiny_path), _placement(), adapter=str(tmp_path))
    assert model.config.rope_parameters["rope_type"] == "yarn" and model.config.max_position_embeddings == 4096
    assert model.get_input_embeddings().weight.shape[0] == 49152  # no tokens were added
