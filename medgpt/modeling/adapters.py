"""PEFT adapters: LoRA, DoRA and QLoRA (LoRA over a 4/8-bit base), or full fine-tuning for lora=none."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def target_modules(lora: DictConfig, model_cfg: DictConfig) -> list[str] | str:
    """lora.target_modules, else model.target_modules, else every linear layer but the output head."""
    chosen = lora.target_modules or model_cfg.target_modules
    return list(chosen) if chosen else "all-linear"


def apply_adapter(model, lora: DictConfig, model_cfg: DictConfig, gradient_checkpointing: bool = False):
    """Wrap `model` for training as `lora` says; returns the model to hand to the trainer."""
    if lora.name == "none":
        model.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=target_modules(lora, model_cfg), use_dora=lora.use_dora or lora.name == "dora",
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("adapter: %s r=%d alpha=%d on %s: %.2fM trainable of %.1fM (%.2f%%)", lora.name, lora.r, lora.alpha,
             _leaf_names(config.target_modules), trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def _leaf_names(modules) -> str:
    return modules if isinstance(modules, str) else ",".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))
