"""bf16 mixed precision on the CPU (hardware.dtype=bf16): frozen base in bf16, every trainable weight and the optimiser
state in fp32, the forward under the CPU autocast that accelerate derives from the Trainer's own bf16=True.

A few steps of the real Trainer on the tiny model (in-process, no launch), compared with the same steps in fp32 (hardware=cpu).
Also: where `hardware=auto` picks bf16 on the CPU (the flags, the quality-check switch), and that hardware=cpu stays fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose

from medgpt.modeling import precision
from medgpt.modeling.loader import resolve_placement

FP32, BF16 = torch.float32, torch.bfloat16
STEPS = 4


def _train(tmp_path: Path, overrides: list[str]) -> dict:
    """STEPS optimiser steps of the Trainer as medgpt configures it; the placement, dtypes seen and losses."""
    from transformers import Trainer

    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import load_model, resolve_model_path
    from medgpt.stages.training import training_arguments

    cfg = compose(["model=tiny", f"paths.root={ROOT}", f"method.max_steps={STEPS}", "method.learning_rate=1e-2", "method.warmup_ratio=0",
                   "method.logging_steps=1", "method.save_steps=0", "method.eval_steps=0", "hardware.batch_size=2", *overrides])
    placement = resolve_placement(cfg.hardware, full_finetune=cfg.lora.name == "none")
    path = resolve_model_path(cfg.model.name_or_path, cfg.paths.cache_dir)
    torch.manual_seed(0)
    model = apply_adapter(load_model(path, placement), cfg.lora, cfg.model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    seen = []  # (autocast on, output dtype) of a frozen base linear layer at each training forward
    base = next(m for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "q_proj")) and isinstance(m, torch.nn.Linear))
    base.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (16, 24), generator=gen)
    data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
    args = training_arguments(cfg, tmp_path / "checkpoints", placement, has_eval=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"placement": placement, "frozen": frozen, "trainable": {p.dtype for p in model.parameters() if p.requires_grad},
            "optim": {t.dtype for t in state}, "seen": set(seen), "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
            "flags": (args.bf16, args.fp16)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_bf16")
    return {name: _train(tmp / name, overrides) for name, overrides in {
        "fp32": ["hardware=cpu"], "bf16": ["hardware=cpu", "hardware.dtype=bf16"],
        "full_bf16": ["hardware=cpu", "hardware.dtype=bf16", "lora=none"]}.items()}


def test_lora_over_a_bf16_base_trains_fp32_weights_under_autocast(runs):
    bf16 = runs["bf16"]
    assert bf16["flags"] == (True, False)  # the Trainer's own bf16=True: accelerate turns it into torch.autocast("cpu", bf16)
    assert bf16["frozen"] == {BF16} and bf16["trainable"] == {FP32} and bf16["optim"] == {FP32}
    assert bf16["seen"] == {(True, BF16)}  # every training forward of a base layer ran under CPU autocast
    assert len(bf16["losses"]) == STEPS and all(map(math.isfinite, bf16["losses"]))


def test_full_fine_tuning_keeps_fp32_master_weights(runs):
    full = runs["full_bf16"]
    assert full["placement"].load_dtype == FP32 and full["placement"].mixed_precision == "bf16"
    assert full["frozen"] == set() and full["trainable"] == {FP32} and full["optim"] == {FP32}
    assert full["seen"] == {(True, BF16)}
    assert all(map(math.isfinite, full["losses"]))


def test_fp32_runs_without_autocast_and_bf16_stays_close(runs):
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["flags"] == (False, False) and fp32["frozen"] == fp32["trainable"] == fp32["optim"] == {FP32}
    assert fp32["seen"] == {(False, FP32)}
    assert fp32["losses"] != bf16["losses"]  # bf16 really computed something else ...
    for a, b in zip(fp32["losses"], bf16["losses"], strict=True):
        assert abs(a - b) / a < 0.02, (fp32["losses"], bf16["losses"])  # ... within 2% of fp32 at every step


def test_modules_to_save_are_fp32_over_a_bf16_base(tiny_path):
    from omegaconf import OmegaConf

    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import Placement, load_model

    lora = OmegaConf.create({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "modules_to_save": ["lm_head"],
                             "use_dora": False, "quantization": None})
    model = apply_adapter(load_model(str(tiny_path), Placement("cpu", BF16, "sdpa")), lora, OmegaConf.create({"target_modules": None}),
                          trainable_token_indices={"embed_tokens": [1, 2]})
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any("token_adapter" in n for n in trainable)
    assert set(trainable.values()) == {FP32}, trainable
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {BF16}  # only what trains is upcast


@pytest.mark.parametrize(("flags", "native"), [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True),
                                               ("fpu avx512f avx512_vnni avx2", False)])
def test_cpu_bf16_native_reads_the_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert precision.cpu_bf16_native(str(cpuinfo)) is native
    assert precision.cpu_bf16_native(str(tmp_path / "missing")) is False  # not Linux: no flags, no bf16


@pytest.mark.parametrize(("native", "decided", "dtype"), [(True, True, "bf16"), (False, True, "fp32"), (True, False, "fp32")])
def test_auto_on_the_cpu(monkeypatch, native, decided, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: native)
    monkeypatch.setattr(precision, "CPU_BF16_AUTO", decided)
    assert precision.auto_dtype("cpu") == dtype
    auto = resolve_placement(compose(["hardware=auto"]).hardware)
    assert (auto.load_dtype, auto.mixed_precision) == ((BF16, "bf16") if dtype == "bf16" else (FP32, None))
    cpu = resolve_placement(compose(["hardware=cpu"]).hardware)  # the preset is fp32 whatever the CPU has
    assert (cpu.device, cpu.load_dtype, cpu.mixed_precision) == ("cpu", FP32, None)
