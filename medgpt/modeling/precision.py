"""Precision from one place: the dtype the weights load in, and the mixed precision the Trainer runs.

`resolve_precision(device, dtype, full_finetune)` turns the device and the hardware dtype, both already
resolved, into `(load dtype, mixed precision)`. loader.resolve_placement stores both on the Placement, and
`Placement.trainer_flags()` gives the Trainer its bf16/fp16 flags from them. So `hardware=auto` on a GPU
and the preset for that GPU come out the same, and the Trainer never reads the raw `hardware.dtype`.

    device  dtype  adapter (lora/qlora/dora)         full fine-tuning (lora=none)
    cuda    bf16   bf16 weights, bf16 autocast       bf16 weights, bf16 autocast
    cuda    fp16   fp16 weights, fp16 AMP            fp32 weights, fp16 AMP (fp32 master weights)
    mps     bf16   bf16 weights, bf16 autocast       bf16 weights, bf16 autocast
    mps     fp16   fp16 weights, no autocast         fp32 weights, no autocast
    cpu     bf16   bf16 weights, bf16 autocast       fp32 weights, bf16 autocast (fp32 master weights)
    any     fp32   fp32 weights, no autocast         fp32 weights, no autocast

- fp16 mixed precision (autocast + GradScaler) exists only on CUDA. Its GradScaler refuses fp16
  gradients, so every trainable weight must be fp32: full fine-tuning loads fp32 master weights, and
  adapters.apply_adapter keeps LoRA weights in fp32 over an fp16 base (see there).
- bf16 on the CPU is mixed precision, as on a GPU: the frozen base loads in bf16, every weight that
  trains is fp32 (LoRA/DoRA weights, added-token rows and modules_to_save: adapters.apply_adapter; for
  full fine-tuning all of them: fp32 master weights), and the forward runs under
  `torch.autocast("cpu", torch.bfloat16)`, which accelerate (1.15) puts around the model's forward for
  the Trainer's `bf16=True` on a CPU (`Accelerator.native_amp`). The optimiser state follows the
  trainable weights: fp32. Only the matmuls run in bf16, fast where the CPU has bf16 instructions.
- `dtype=auto` on the CPU is bf16 where the CPU computes bf16 natively (`cpu_bf16_native`: the
  avx512_bf16 or amx_bf16 flag), fp32 elsewhere; `hardware=cpu` is always fp32. CPU_BF16_AUTO records
  the quality check that decided it: the demo SFT (`experiment=sft_lora_demo`, seed 42, 31 steps) on
  a 2-core CPU with avx512_bf16 (no AMX), held-out eval loss after training 2.5057 in fp32 and 2.5092
  with `hardware.dtype=bf16` (+0.14%; before training 3.2310 and 3.2297; mean train loss 2.6266 and
  2.6350, +0.32%), within the 1% the rule allows (2026-11-28, machine shared, so no timing from it;
  the fp32 run, restarted after an out-of-memory kill, skipped the evaluations every 10 steps, which
  moved its train losses by < 0.1% against the killed run that made them).
  The inference modes (serve, chat, predict, eval) under `auto` on such a CPU then load the weights in
  bf16 (no autocast there: the weights are the dtype), the same decision. Tests that compare exact
  fp32 numbers pin `hardware=cpu`.
- `dtype=auto` on CUDA is bf16 only where the GPU computes it natively (compute capability >= 8.0:
  A100, H100, ...; or ROCm). `torch.cuda.is_bf16_supported()` is not asked: it answers True on a T4 or
  V100 too, because bf16 can be emulated there (slowly), which would make `auto` differ from `t4`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_PRECISION = ("bf16", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute bf16 natively (Cooper Lake, Sapphire Rapids, Zen 4+)
CPU_BF16_AUTO = True  # `dtype=auto` picks bf16 on such CPUs: the quality check in the docstring passed (+0.14% held-out loss)


def cuda_capability() -> tuple[int, int]:
    """The compute capability of the current CUDA device, e.g. (7, 5) for a T4, (8, 0) for an A100."""
    return tuple(torch.cuda.get_device_capability())


def cuda_bf16_native() -> bool:
    """True when the visible GPU computes bf16 natively (Ampere or newer, or ROCm); False on T4 / V100."""
    if torch.version.hip:
        return True
    return cuda_capability()[0] >= 8


@functools.cache
def cpu_bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has avx512_bf16 or amx_bf16 (Linux: the flags in /proc/cpuinfo); False elsewhere (no such file)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def auto_dtype(device: str) -> str:
    """What `hardware.dtype=auto` means on `device` (already resolved: cuda | mps | cpu)."""
    if device == "cuda":
        return "bf16" if cuda_bf16_native() else "fp16"
    if device == "cpu" and CPU_BF16_AUTO and cpu_bf16_native():
        return "bf16"
    return "fp32"


def resolve_precision(device: str, dtype: str, full_finetune: bool = False) -> tuple[torch.dtype, str | None]:
    """(the dtype the weights load in, the Trainer's mixed precision "bf16" | "fp16" | None); see the table above.

    `device` is cuda | mps | cpu and `dtype` is fp32 | fp16 | bf16 (both already resolved from "auto").
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if dtype == "bf16" and device == "cuda" and not torch.version.hip and cuda_capability()[0] < 8:
        log.warning("hardware.dtype=bf16 on a GPU of compute capability %d.%d: bf16 is emulated there (slow); "
                    "fp16 (hardware=t4, or hardware.dtype=fp16) is the native choice", *cuda_capability())
    if dtype == "bf16" and device == "cpu" and not cpu_bf16_native():
        log.warning("hardware.dtype=bf16 on a CPU without %s: bf16 is emulated there (slower than fp32); "
                    "hardware=cpu trains in fp32", " or ".join(CPU_BF16_FLAGS))
    mixed = None
    if dtype == "bf16":
        mixed = "bf16"
    elif dtype == "fp16" and device == "cuda":
        mixed = "fp16"
    load = DTYPES[dtype]
    if full_finetune and (dtype == "fp16" or (dtype == "bf16" and device == "cpu")):
        load = torch.float32  # every weight trains: fp32 master weights, fp16/bf16 only inside autocast
    return load, mixed


def trainer_flags(mixed_precision: str | None) -> dict[str, bool]:
    """transformers.TrainingArguments' `bf16` and `fp16` for a mixed precision "bf16" | "fp16" | None."""
    if mixed_precision not in (None, *MIXED_PRECISION):
        raise ValueError(f"unknown mixed precision {mixed_precision!r}")
    return {"bf16": mixed_precision == "bf16", "fp16": mixed_precision == "fp16"}
