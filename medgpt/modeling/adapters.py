"""PEFT adapters: LoRA, DoRA and QLoRA (LoRA over a 4/8-bit base), or full fine-tuning for lora=none.

Precision of what trains. With an adapter every trainable weight is fp32 over an fp16 or bf16 base: the
LoRA/DoRA weights and added-token rows by PEFT (`autocast_adapter_dtype=True`, passed explicitly), and
modules_to_save here. For lora=none a trainable fp16 weight is cast to fp32 too; a bf16 one stays
(medgpt.modeling.precision chose the load dtype knowing every weight trains: fp32 master weights for
bf16 on the CPU, bf16 weights on a GPU). fp16 training then runs as autocast with fp32 weights, the only
way the Trainer's fp16 GradScaler works (it refuses fp16 gradients), and in both fp16 and bf16 the
optimiser state is fp32 and Adam updates are not rounded away (a bf16 weight keeps 8 bits of mantissa:
an update below 1/256 of it vanishes).

QLoRA on the CPU. bitsandbytes (>= 0.49) has a fast CPU path for 4-bit layers on CPUs with AVX512-BF16:
the first forward of a `Linear4bit` in eval mode without gradients (the evaluation before training does
exactly that) repacks its weight in place into an inference-only layout, and every later forward, in
train mode too, goes through `bitsandbytes::gemv_4bit`. That op computes in bf16 and has no autograd
kernel, so no gradient flows back through a 4-bit layer, only along the residual stream and the adapters
themselves: apart from the last layer's down_proj, every adapter gets a wrong gradient (on the tiny
model, after one eval forward: relative errors 0.8 to 1.4, cosines 0.6 down to below 0), while training
exits 0 and PyTorch only warns that this "may lead to silently incorrect behavior".
`disable_4bit_cpu_packing` turns the repacking off on every `Linear4bit` of a model being trained
(`support_avx512bf16_for_cpu = False`, the switch bitsandbytes itself reads) and unpacks any layer that
was already repacked, so a model evaluated before `apply_adapter` trains correctly too (unpacking, done
by bitsandbytes' own inverse, returns the 4-bit codes exactly but the block scales as rounded to bf16
for the packed layout: weights within 0.3%, measured). Forwards then always de-quantise and run the
autograd-aware `matmul_4bit`, in train and eval mode alike, so the eval loss is computed the way
training computes the loss. Only models given to `apply_adapter` (training) are changed: a 4-bit model
loaded for inference keeps the fast path. tests/test_qlora_cpu.py compares the adapter gradients with
the same LoRA over the de-quantised fp32 weights.
"""

from __future__ import annotations

import logging
import sys

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def target_modules(lora: DictConfig, model_cfg: DictConfig) -> list[str] | str:
    """lora.target_modules, else model.target_modules, else every linear layer but the output head."""
    chosen = lora.target_modules or model_cfg.target_modules
    return list(chosen) if chosen else "all-linear"


def apply_adapter(model, lora: DictConfig, model_cfg: DictConfig, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM",
                  trainable_token_indices: dict[str, list[int]] | None = None):
    """Wrap `model` for training as `lora` says; returns the model to hand to the trainer.

    task_type="SEQ_CLS" (a reward model, medgpt.stages.methods.rm): the `score` head is trained fully (modules_to_save)
    and kept out of the LoRA targets. `trainable_token_indices` ({embedding module name: row ids}, from
    medgpt.modeling.vocab.trainable_rows): those rows of the embeddings train besides the adapter (added tokens),
    unless lora.modules_to_save already trains the whole module."""
    if lora.name == "none":
        model.requires_grad_(True)
        _upcast_trainables(model, (torch.float16,))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    to_save = list(lora.modules_to_save or [])
    if task_type == "SEQ_CLS" and "score" not in to_save:
        to_save.append("score")  # the reward head starts random: train all of it
    rows = {name: ids for name, ids in (trainable_token_indices or {}).items() if name not in to_save} or None
    config = LoraConfig(
        task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=target_modules(lora, model_cfg), use_dora=lora.use_dora or lora.name == "dora",
        modules_to_save=to_save or None, trainable_token_indices=rows,
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=True)  # LoRA weights in fp32 over an fp16/bf16 base
    disable_4bit_cpu_packing(model)
    _upcast_trainables(model, (torch.float16, torch.bfloat16))  # modules_to_save: PEFT copies them in the base's dtype
    trainable, total = model.get_nb_trainable_parameters()
    log.info("adapter: %s r=%d alpha=%d on %s: %.2fM trainable of %.1fM (%.2f%%)", lora.name, lora.r, lora.alpha,
             _leaf_names(config.target_modules), trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def _leaf_names(modules) -> str:
    return modules if isinstance(modules, str) else ",".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))


def disable_4bit_cpu_packing(model) -> int:
    """Keep bitsandbytes' 4-bit layers trainable on the CPU (see the module docstring); returns how many layers it unpacked.

    Idempotent, and harmless on a GPU (the switch only concerns CPU forwards) or without 4-bit layers.
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer without it; importing it would only cost time and a log line
        return 0
    from bitsandbytes.nn import Linear4bit

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            # bitsandbytes' own inverse (what Linear4bit.cuda() and state_dict() use); the 4-bit codes come back exactly,
            # the block scales as they were rounded to bf16 for the packed layout
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = module.weight.quant_state
            unpacked += 1
    if unpacked:
        log.info("unpacked %d 4-bit layers from bitsandbytes' CPU inference layout for training", unpacked)
    return unpacked


def _upcast_trainables(model, dtypes: tuple[torch.dtype, ...]) -> None:
    """Cast every trainable weight of one of `dtypes` to fp32 (mixed precision trains fp32 weights; see the module docstring)."""
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype in dtypes]
    if not upcast:
        return
    log.info("trainable weights in fp32 over the %s model: %.2fM upcast", str(upcast[0].dtype).removeprefix("torch."),
             sum(p.numel() for p in upcast) / 1e6)
    for p in upcast:
        p.data = p.data.float()
