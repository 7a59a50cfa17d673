"""Precision from one place: load dtype and Trainer flags come from the resolved placement, for auto and presets alike.

CUDA is faked (torch.cuda.is_available / get_device_capability / is_bf16_supported), so these run on a CPU.
`is_bf16_supported` is faked to say True everywhere, as torch does on a T4 or V100 (it counts emulation):
hardware=auto must still pick fp16 there, like hardware=t4.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from medgpt.modeling import loader, precision
from medgpt.modeling.loader import Placement, resolve_placement

CAPABILITY = {"t4": (7, 5), "v100": (7, 0), "a100": (8, 0), "h100": (9, 0)}
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
OFF = {"bf16": False, "fp16": False}
BF = {"bf16": True, "fp16": False}
FP = {"bf16": False, "fp16": True}


@pytest.fixture(scope="module")
def presets():
    return {name: compose([f"hardware={name}"]).hardware for name in ("auto", "cpu", "t4", "a100", "h100")}


def fake(monkeypatch, gpu: str | None = None, mps: bool = False, flash_attn: bool = True, cpu_bf16: bool = False) -> None:
    """Make torch see `gpu` (a key of CAPABILITY), or no GPU (then MPS if `mps`); a CPU with avx512_bf16/amx_bf16 if `cpu_bf16`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: CAPABILITY[gpu])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu is not None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(loader, "_flash_attn_installed", lambda: flash_attn)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: cpu_bf16)


def _hw(presets, name, dtype=None):
    hw = presets[name]
    return OmegaConf.merge(hw, {"dtype": dtype}) if dtype else hw


# (GPU or None for a CPU machine, hardware preset, hardware.dtype override, full fine-tuning) -> (load dtype, Trainer flags)
TABLE = [
    (None, "cpu", None, False, FP32, OFF),
    (None, "cpu", None, True, FP32, OFF),
    (None, "auto", None, False, FP32, OFF),
    (None, "auto", None, True, FP32, OFF),
    (None, "cpu", "bf16", False, BF16, BF),  # bf16 on the CPU: frozen bf16 base, fp32 adapters, CPU autocast
    (None, "cpu", "bf16", True, FP32, BF),  # full fine-tuning: fp32 master weights, CPU autocast
    ("t4", "t4", None, False, FP16, FP),  # LoRA: frozen fp16 base, fp32 adapters, fp16 AMP
    ("t4", "t4", None, True, FP32, FP),  # full fine-tuning: fp32 master weights, fp16 AMP
    ("t4", "auto", None, False, FP16, FP),
    ("t4", "auto", None, True, FP32, FP),
    ("t4", "t4", "fp32", False, FP32, OFF),
    ("t4", "t4", "fp32", True, FP32, OFF),
    ("v100", "auto", None, False, FP16, FP),
    ("v100", "auto", None, True, FP32, FP),
    ("a100", "a100", None, False, BF16, BF),
    ("a100", "a100", None, True, BF16, BF),
    ("a100", "auto", None, False, BF16, BF),
    ("a100", "auto", None, True, BF16, BF),
    ("a100", "a100", "fp16", False, FP16, FP),
    ("a100", "a100", "fp16", True, FP32, FP),
    ("a100", "a100", "fp32", False, FP32, OFF),
    ("h100", "h100", None, False, BF16, BF),
    ("h100", "auto", None, True, BF16, BF),
]


@pytest.mark.parametrize(("gpu", "preset", "dtype", "full", "load", "flags"), TABLE)
def test_precision_table(monkeypatch, presets, gpu, preset, dtype, full, load, flags):
    fake(monkeypatch, gpu)
    placement = resolve_placement(_hw(presets, preset, dtype), full_finetune=full)
    assert placement.device == ("cuda" if gpu else "cpu")
    assert (placement.load_dtype, placement.trainer_flags()) == (load, flags)
    assert placement.dtype is placement.load_dtype


@pytest.mark.parametrize(("gpu", "preset"), [("t4", "t4"), ("v100", "t4"), ("a100", "a100"), ("h100", "h100")])
@pytest.mark.parametrize("full", [False, True])
def test_auto_equals_the_preset_of_its_gpu(monkeypatch, presets, gpu, preset, full):
    fake(monkeypatch, gpu)
    auto = resolve_placement(presets["auto"], full_finetune=full)
    assert auto == resolve_placement(presets[preset], full_finetune=full)  # device, load dtype, attention, mixed precision
    assert auto.attn_implementation == ("sdpa" if preset == "t4" else "flash_attention_2")  # flash-attn 2 needs Ampere+


def test_no_flash_attention_without_the_package(monkeypatch, presets):
    fake(monkeypatch, "a100", flash_attn=False)
    assert resolve_placement(presets["a100"]).attn_implementation == resolve_placement(presets["auto"]).attn_implementation == "sdpa"


def test_mps(monkeypatch, presets):
    fake(monkeypatch, None, mps=True)
    auto = resolve_placement(presets["auto"])
    assert (auto.device, auto.load_dtype, auto.trainer_flags()) == ("mps", FP32, OFF)
    bf16 = resolve_placement(_hw(presets, "auto", "bf16"))
    assert (bf16.load_dtype, bf16.trainer_flags()) == (BF16, BF)
    fp16 = resolve_placement(_hw(presets, "auto", "fp16"))  # fp16 AMP is CUDA-only
    assert (fp16.load_dtype, fp16.trainer_flags()) == (FP16, OFF)
    assert resolve_placement(_hw(presets, "auto", "fp16"), full_finetune=True).load_dtype == FP32


def test_bf16_on_a_t4_is_allowed_with_a_warning(monkeypatch, presets, caplog):
    fake(monkeypatch, "t4")
    with caplog.at_level(logging.WARNING, logger="medgpt.modeling.precision"):
        placement = resolve_placement(_hw(presets, "auto", "bf16"))
    assert (placement.load_dtype, placement.trainer_flags()) == (BF16, BF)
    assert "emulated" in caplog.text


def test_a_hand_made_placement_trains_without_autocast():
    placement = Placement("cpu", FP32, "sdpa")
    assert placement.mixed_precision is None and placement.trainer_flags() == OFF and placement.load_dtype == FP32


def _lora(name="lora", modules_to_save=None):
    return OmegaConf.create({"name": name, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None,
                             "modules_to_save": modules_to_save, "use_dora": False, "quantization": None})


@pytest.mark.parametrize(("name", "modules_to_save"), [("lora", None), ("dora", None), ("lora", ["lm_head"]), ("none", None)])
def test_trainable_weights_are_fp32_over_an_fp16_model(tiny_path, name, modules_to_save):
    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import load_model

    model = load_model(str(tiny_path), Placement("cpu", FP16, "sdpa"))
    model = apply_adapter(model, _lora(name, modules_to_save), OmegaConf.create({"target_modules": None}))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {FP32}, {n: d for n, d in trainable.items() if d != FP32}
    if name != "none":  # the frozen base stays in fp16: only what trains is upcast
        assert {p.dtype for n, p in model.named_parameters() if "base_layer" in n} == {FP16}
