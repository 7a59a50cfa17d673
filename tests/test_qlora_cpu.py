"""QLoRA on the CPU trains correctly: its adapter gradients equal those of the same LoRA over the de-quantised weights.

The trap (medgpt/modeling/adapters.py explains it): on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit
layer's weight into an inference-only layout on its first eval-mode forward without gradients (the
evaluation before training does one), and from then on the layer runs an op without autograd: the
gradient stops at every 4-bit layer. Measured here without the fix (bitsandbytes 0.50.2, a CPU with
avx512_bf16), over a few runs: all adapter gradients together cosine ~0.1, relative error ~1.15; layer
0's adapters cosine between -0.1 and 0.15, relative errors 1.07 to 1.4. With the fix the QLoRA gradients equal the fp32 reference exactly
(relative error 0.0, cosine 1.0 to float rounding: the layer de-quantises and runs the same fp32
matmul), so the bounds below (cosine > 0.9999, relative error < 1e-3) catch any broken layer and leave
room for other BLAS libraries. On a CPU without AVX512-BF16
the first test passes with or without the fix; the second packs the layers by hand and needs the fix
anywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("bitsandbytes")

import bitsandbytes as bnb  # noqa: E402
from bitsandbytes.functional import dequantize_4bit  # noqa: E402

from medgpt.modeling.adapters import apply_adapter  # noqa: E402
from medgpt.modeling.loader import Placement, load_model  # noqa: E402

CPU = Placement("cpu", torch.float32, "sdpa")
MODEL_CFG = OmegaConf.create({"target_modules": None})
COSINE, REL_ERR = 0.9999, 1e-3


def _lora(quantization):
    return OmegaConf.create({"name": "qlora" if quantization else "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                             "target_modules": None, "modules_to_save": None, "use_dora": False, "quantization": quantization})


def _linear4bit(model) -> dict:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _packed(model) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in _linear4bit(model).values())


def _batch():
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _eval_forward(model, batch):
    """What the evaluation before training does: eval mode, no gradients."""
    model.eval()
    with torch.no_grad():
        model(**batch)


def _compare(qlora, tiny_path, batch) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Train-mode forward/backward of `qlora` and of the same LoRA over its de-quantised weights in fp32.

    Returns {adapter parameter (and "all"): (cosine, relative error)} of the QLoRA gradients against the
    reference, and PyTorch's warnings about ops without an autograd kernel during the QLoRA forward/backward.
    """
    reference = load_model(str(tiny_path), CPU)
    reference.config.use_cache = False
    reference = apply_adapter(reference, _lora(None), MODEL_CFG)
    ref_params = dict(reference.named_parameters())
    ref_modules = {name.removeprefix("base_model.model."): m for name, m in reference.named_modules()}
    with torch.no_grad():
        for name, layer in _linear4bit(qlora).items():  # the base weights training will use, de-quantised
            ref_modules[name].weight.copy_(dequantize_4bit(layer.weight.data, layer.weight.quant_state).float())
        for name, p in qlora.named_parameters():  # the same adapter weights
            if p.requires_grad:
                ref_params[name].copy_(p)
    assert {n for n, p in qlora.named_parameters() if p.requires_grad} == {n for n, p in reference.named_parameters() if p.requires_grad}

    qlora.train()
    reference.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qlora(**batch).loss.backward()
    no_autograd = [str(w.message)[:120] for w in caught if "autograd kernel was not registered" in str(w.message)]
    reference(**batch).loss.backward()

    result, all_q, all_r = {}, [], []
    for name, p in qlora.named_parameters():
        if p.requires_grad:
            g, r = p.grad.flatten(), ref_params[name].grad.flatten()
            all_q.append(g)
            all_r.append(r)
            result[name] = (torch.cosine_similarity(g, r, dim=0).item(), ((g - r).norm() / r.norm()).item())
    g, r = torch.cat(all_q), torch.cat(all_r)
    result["all"] = (torch.cosine_similarity(g, r, dim=0).item(), ((g - r).norm() / r.norm()).item())
    return result, no_autograd


def _load_qlora(tiny_path):
    model = load_model(str(tiny_path), CPU, quantization="4bit")
    model.config.use_cache = False
    return model


def _adapt(model):
    model = apply_adapter(model, _lora("4bit"), MODEL_CFG)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient: make both matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _assert_agree(compared):
    result, no_autograd = compared
    bad = {name.removeprefix("base_model.model.model."): tuple(round(v, 4) for v in vals) for name, vals in result.items()
           if vals[0] < COSINE or vals[1] > REL_ERR}
    assert not bad, f"QLoRA gradients differ from the de-quantised fp32 LoRA's (cosine, relative error): {bad}"
    assert not no_autograd, no_autograd


def test_qlora_cpu_gradients_after_an_eval_forward_match_the_dequantised_lora(tiny_path):
    batch = _batch()
    model = _adapt(_load_qlora(tiny_path))
    assert _linear4bit(model), "the 4-bit load made no Linear4bit layers"
    _eval_forward(model, batch)  # the evaluation before training
    _assert_agree(_compare(model, tiny_path, batch))
    assert _packed(model) == 0, "an eval forward repacked 4-bit layers into bitsandbytes' inference-only CPU layout"


def test_qlora_cpu_unpacks_layers_repacked_before_the_adapter(tiny_path):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    batch = _batch()
    model = _load_qlora(tiny_path)
    _eval_forward(model, batch)  # repacks on a CPU with AVX512-BF16
    for layer in _linear4bit(model).values():  # elsewhere, pack by hand the way bitsandbytes does
        if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert _packed(model) == len(_linear4bit(model)) > 0
    model = _adapt(model)
    _eval_forward(model, batch)
    _assert_agree(_compare(model, tiny_path, batch))  # against the weights as unpacked (block scales rounded to bf16)
    assert _packed(model) == 0
