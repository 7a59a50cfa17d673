"""What the training stages share: model set-up, Trainer arguments and callbacks, evaluation, saving artefacts.

Kept to plain functions so that each stage still reads top to bottom. The Trainer gets medgpt's
callbacks (medgpt.tracking): metrics.jsonl (+ W&B / TensorBoard), the interrupt guard, the loss
watchdog and early stopping; `stop_if_interrupted` turns their verdict into RunInterrupted or
TrainingDiverged after `trainer.train()`; `resume_checkpoint` is what `resume=true` continues from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import Trainer, TrainingArguments

from medgpt.data.templates import SAVED_TEMPLATE, Template, load_saved_template, resolve_template, stop_token_ids
from medgpt.errors import ArtefactError, ConfigError, RunInterrupted
from medgpt.modeling.adapters import apply_adapter
from medgpt.modeling.loader import Placement, load_model, load_tokenizer, resolve_model_path, resolve_placement
from medgpt.modeling.rope import rope_settings
from medgpt.modeling.vocab import add_token_rows, base_changes, extend_tokenizer, record_base_changes, requested_tokens, trainable_rows
from medgpt.stages.protocol import TrainingParts
from medgpt.tracking import loggers
from medgpt.tracking.guards import EarlyStopping, InterruptGuard, LossWatchdog, TrainingDiverged
from medgpt.tracking.metrics import MetricsCallback, MetricsWriter, perplexity
from medgpt.tracking.plots import plot_loss
from medgpt.tracking.resume import checkpoint_step, latest_checkpoint
from medgpt.tracking.rundir import RunDir, read_summary, resolve_run, trained_run

log = logging.getLogger(__name__)


@dataclass
class Setup:
    placement: Placement
    model_path: str  # the weights training starts from (a base model, or a finished run's full weights)
    tokenizer: object
    template: Template
    init_from: str | None = None  # the finished run this one starts from
    root_model_path: str = ""  # the pretrained model at the start of the chain of runs
    new_tokens: dict = field(default_factory=dict)  # model.add_tokens: {new id: its sub-token ids before} (modeling.vocab)


def prepare(cfg: DictConfig) -> Setup:
    """Placement, starting weights, tokenizer and template: everything the data needs before the model loads."""
    placement = resolve_placement(cfg.hardware, full_finetune=cfg.lora.name == "none")  # weights dtype + Trainer precision
    if cfg.deepspeed.zero_stage and placement.device != "cuda":
        raise ConfigError(f"deepspeed={cfg.deepspeed.name} needs CUDA GPUs; use deepspeed=none here.")
    init_from, saved_template = None, None
    if cfg.model.init_from:  # start from a finished run: its merged (or fully fine-tuned) weights and its template
        from medgpt.stages.merge import ensure_full_model

        run = trained_run(resolve_run(cfg.model.init_from, Path(cfg.paths.output_dir)))  # a pipeline root: its last stage
        model_path, init_from = str(ensure_full_model(run)), str(run)
        saved_template = load_saved_template(Path(model_path))
        prior = read_summary(run)
        root = prior.get("root_model_path") or prior.get("base_model_path") or model_path
        log.info("starting from run %s (%s)", run, model_path)
    else:
        model_path = resolve_model_path(cfg.model.name_or_path, cfg.paths.cache_dir, cfg.model.revision)
        root = model_path
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    new_tokens = extend_tokenizer(tokenizer, requested_tokens(cfg.model, cfg.paths.root))  # before the data is tokenised
    if new_tokens and cfg.method.name not in VOCAB_METHODS:
        raise ConfigError(f"model.add_tokens adds {len(new_tokens)} new tokens, which method={cfg.method.name} cannot train (its "
                          "reference or reward model loads without them): add them in a pt or sft run and start from it (model.init_from).")
    if saved_template is not None and cfg.template.name == "auto":
        template = saved_template
    else:
        template = resolve_template(cfg.template, cfg.model.template, tokenizer)
    log.info("template: %s (stop %r)", template.name, template.stop_string(tokenizer.bos_token, tokenizer.eos_token))
    return Setup(placement, model_path, tokenizer, template, init_from, root, new_tokens)


VOCAB_METHODS = ("pt", "sft")  # the methods that train added tokens (the others load a second model without them)


def build_model(cfg: DictConfig, setup: Setup):
    """The starting weights (RoPE scaling applied at load; added tokens' rows resized in, each the mean of its sub-tokens'),
    wrapped as `lora` says; with an adapter only the added rows of the embeddings train (medgpt.modeling.vocab)."""
    rope = rope_settings(cfg.model)
    model = load_model(setup.model_path, setup.placement, cfg.lora.quantization, cfg.model.trust_remote_code, cfg.model.revision,
                       rope_scaling=rope)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if setup.new_tokens:
        add_token_rows(model, len(setup.tokenizer), setup.new_tokens)
    rows = trainable_rows(model, list(setup.new_tokens)) if setup.new_tokens else None
    model = apply_adapter(model, cfg.lora, cfg.model, cfg.hardware.gradient_checkpointing, trainable_token_indices=rows)
    if cfg.lora.name != "none" and (rope or setup.new_tokens):  # the adapter's base must be reshaped the same way to load it
        record_base_changes(model, base_changes(len(setup.tokenizer) if setup.new_tokens else None, setup.new_tokens, rope))
    return model


def deepspeed_config(ds: DictConfig) -> dict | None:
    """A ZeRO config with "auto" values that the Trainer fills from its own arguments."""
    if ds.zero_stage == 0:
        return None
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto"}


def distributed_arguments(cfg: DictConfig) -> dict:
    """DDP / FSDP settings for a multi-process run (torchrun workers); nothing for one process.

    The backend comes from the launcher (MEDGPT_DIST_BACKEND: nccl on CUDA, gloo on CPU). fsdp=full_shard |
    shard_grad_op is torch's FSDP2 (`fully_shard`: every parameter a DTensor sharded across the ranks, so frozen
    base weights and trainable LoRA weights share a unit, what FSDP1 needed use_orig_params for): one unit per
    decoder layer (the model's `_no_split_modules`, TRANSFORMER_BASED_WRAP) plus the root; full_shard reshards the
    parameters after each forward, shard_grad_op keeps them (ZeRO-2-like). Saving gathers a full state dict on rank 0.
    On CPU ranks see `fsdp_on_cpu` and `evaluate_before_training` (both needed, also on GPUs for the latter).
    """
    backend = os.environ.get("MEDGPT_DIST_BACKEND")
    if not backend or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    out: dict = {"ddp_backend": backend,
                 "ddp_find_unused_parameters": False}  # every trainable weight takes part in every step
    fsdp = cfg.get("fsdp")
    if fsdp is not None and fsdp.name != "none":
        if fsdp.cpu_offload and backend == "gloo":
            raise ConfigError("fsdp.cpu_offload=true keeps parameters in CPU memory off the GPUs: CPU ranks have no GPU to offload "
                              "from (torch refuses it); leave fsdp.cpu_offload=false here.")
        out["fsdp"] = True
        out["fsdp_config"] = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # fsdp.auto_wrap=decoder_layer
                              "reshard_after_forward": fsdp.name == "full_shard", "cpu_offload": bool(fsdp.cpu_offload),
                              "state_dict_type": "FULL_STATE_DICT"}
    return out


def fsdp_on_cpu(trainer: Trainer) -> None:
    """fsdp=... with CPU ranks (gloo): shard for real. Call right after creating the Trainer.

    accelerate (1.15) turns its FSDP plugin on only for accelerator devices; on CPU it drops the plugin and the run
    silently trains as plain DDP. torch's FSDP2 (`fully_shard`) runs on CPU over gloo, so this switches the
    accelerator's (shared) state to FSDP with the plugin the Trainer built from `distributed_arguments`.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if not trainer.args.fsdp_plugin_args or trainer.is_fsdp_enabled or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # every later AcceleratorState() copies distributed_type from PartialState's shared state: set both
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    log.info("fsdp on CPU ranks: torch FSDP2 (fully_shard) over %s, one unit per decoder layer", trainer.args.ddp_backend)


def evaluate_before_training(trainer: Trainer, evaluate) -> dict:
    """`evaluate(trainer)` before `trainer.train()`, leaving the model for train() to wrap (DDP) or shard (FSDP).

    transformers' evaluate() on a Trainer that has not trained yet prepares the model for evaluation only
    (transformers 5.24 / accelerate 1.15), which breaks a multi-process run:
    - DDP: accelerate's `prepare_model(model, evaluation_mode=True)` marks the bare model prepared, and train() then
      gets it back from `accelerator.prepare(model, optimizer)` unwrapped: no DistributedDataParallel, no gradient
      all-reduce, each rank steps on its own gradients and the ranks drift apart silently. Undone after the evaluation
      (the mark, the mixed-precision forward wrapper, the accelerator's record of the model).
    - FSDP2: accelerate refuses to shard a model without its optimiser ("a model and optimizer must be passed
      together"). The evaluation runs on the model as loaded instead: nothing is sharded before train(), every rank
      holds all of it.
    One process: just the evaluation.
    """
    accelerator, model = trainer.accelerator, trainer.model
    if trainer.args.world_size <= 1 or accelerator._models:
        return evaluate(trainer)
    if trainer.is_fsdp_enabled:
        accelerator._models.append(model)  # evaluate() prepares the model only when the accelerator holds none
        try:
            return evaluate(trainer)
        finally:
            accelerator._models.remove(model)
    metrics = evaluate(trainer)
    if trainer.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        if "_original_forward" in model.__dict__:  # the autocast wrapper prepare_model put around forward (mixed precision)
            model.forward = model.__dict__.pop("_original_forward")
        accelerator._models = [m for m in accelerator._models if m is not model]
    return metrics


def training_arguments(cfg: DictConfig, checkpoints: Path, placement: Placement, has_eval: bool, args_cls: type | None = None,
                       stage_args: dict | None = None) -> TrainingArguments:
    """The Trainer's arguments: medgpt's settings, then the stage's own (`TrainingParts.args_cls` / `args_kwargs`, e.g.
    trl.GRPOConfig and its fields; they may replace a medgpt setting), then `trainer.<field>` passthrough."""
    m, hw = cfg.method, cfg.hardware
    managed = dict(
        output_dir=str(checkpoints),
        per_device_train_batch_size=hw.batch_size,
        per_device_eval_batch_size=hw.eval_batch_size,
        gradient_accumulation_steps=hw.grad_accum,
        num_train_epochs=m.epochs,
        max_steps=m.max_steps,
        learning_rate=m.learning_rate,
        lr_scheduler_type=m.lr_scheduler,
        warmup_steps=m.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=m.weight_decay,
        max_grad_norm=m.max_grad_norm,
        neftune_noise_alpha=m.get("neftune_noise_alpha"),  # NEFTune: the Trainer hooks the input embeddings while training
        train_sampling_strategy=("group_by_length" if m.group_by_length else "random") if m.shuffle else "sequential",
        logging_steps=m.logging_steps,
        eval_strategy="steps" if has_eval and m.eval_steps > 0 else "no",
        eval_steps=m.eval_steps if m.eval_steps > 0 else None,
        save_strategy="steps" if m.save_steps > 0 else "no",
        save_steps=m.save_steps if m.save_steps > 0 else 500,
        save_total_limit=m.save_total_limit,
        **placement.trainer_flags(),  # bf16 / fp16 mixed precision from the resolved placement (medgpt.modeling.precision)
        use_cpu=placement.device == "cpu",
        deepspeed=deepspeed_config(cfg.deepspeed),
        **distributed_arguments(cfg),
        report_to="none",  # W&B / TensorBoard get the metrics.jsonl rows through medgpt.tracking.loggers
        logging_nan_inf_filter=False,  # a NaN loss must reach metrics.jsonl and the watchdog, not be averaged away
        run_name=checkpoints.parent.name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=hw.num_workers,
        remove_unused_columns=False,  # our collators decide what reaches the model
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    managed.update(stage_args or {})
    args_cls = args_cls or TrainingArguments
    return args_cls(**managed, **passthrough(cfg, managed, args_cls))


def passthrough(cfg: DictConfig, managed: dict, args_cls: type = TrainingArguments) -> dict:
    """`trainer.<field>=...`: any other TrainingArguments field (optimiser, scheduler extras, ...), checked by name;
    fields medgpt sets from its own groups are refused with the key that sets them."""
    extra = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else {}
    known = {f.name for f in dataclasses.fields(args_cls)}
    for key in extra:
        if key not in known:
            raise ConfigError(f"trainer.{key} is not a {args_cls.__name__} field (transformers {transformers.__version__}); "
                              "see https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments.")
        if key in managed:
            raise ConfigError(f"trainer.{key} is set by medgpt's own config ({MANAGED_BY.get(key, 'method / hardware')}); set it there.")
    return extra


MANAGED_BY = {"learning_rate": "method.learning_rate", "per_device_train_batch_size": "hardware.batch_size",
              "gradient_accumulation_steps": "hardware.grad_accum", "num_train_epochs": "method.epochs",
              "max_steps": "method.max_steps", "lr_scheduler_type": "method.lr_scheduler", "seed": "seed",
              "bf16": "hardware.dtype", "fp16": "hardware.dtype", "deepspeed": "deepspeed=...", "fsdp": "fsdp=...",
              "neftune_noise_alpha": "method.neftune_noise_alpha"}


def make_trainer(cfg: DictConfig, run: RunDir, setup: Setup, model, parts: TrainingParts, perplexity: bool = True) -> Trainer:
    train_ds, eval_ds = parts.train, parts.eval
    args = training_arguments(cfg, run.checkpoints, setup.placement, eval_ds is not None, parts.args_cls, parts.args_kwargs)
    writer = MetricsWriter(run.metrics) if run.is_main else None  # rank 0 alone writes metrics.jsonl and the tracker
    sequences_per_step = cfg.hardware.batch_size * cfg.hardware.grad_accum
    metrics = MetricsCallback(writer, sequences_per_step, perplexity=perplexity, tracker=loggers.active() if run.is_main else None,
                              resuming=bool(cfg.get("resume")))
    callbacks = [metrics, InterruptGuard()]
    if cfg.watchdog.enabled:
        callbacks.append(LossWatchdog(cfg.watchdog.threshold, cfg.watchdog.patience, cfg.watchdog.window))
    patience = cfg.method.get("early_stopping_patience", 0)
    if patience > 0:
        if eval_ds is None or cfg.method.eval_steps <= 0:
            log.warning("method.early_stopping_patience=%d is off: it needs eval data and method.eval_steps > 0", patience)
        else:
            callbacks.append(EarlyStopping(patience))
    from medgpt.stages.sampling import seeded
    from medgpt.stages.token_loss import LabelledLoss, LMTrainer
    from medgpt.tracking.metrics import quiet_progress

    trainer_cls = seeded(parts.trainer_cls or LMTrainer)  # method.group_by_length: the same batches after a resume
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=parts.collator,
                          processing_class=setup.tokenizer, callbacks=callbacks, **parts.trainer_kwargs)
    if isinstance(trainer, LabelledLoss):
        trainer.fused_loss = cfg.method.fused_loss
    fsdp_on_cpu(trainer)
    quiet_progress(trainer)  # the progress bar without the log dicts beside it (metrics.jsonl has them)
    return trainer


def resume_checkpoint(cfg: DictConfig, run_dir: RunDir) -> str | None:
    """With resume=true, the checkpoint to continue from (trainer.train(resume_from_checkpoint=...)); else None."""
    if not cfg.get("resume"):
        return None
    checkpoint = latest_checkpoint(run_dir.path)
    if checkpoint is None:
        raise ConfigError(f"run {run_dir} has no checkpoint to resume from; start it again without resume=true.")
    log.info("resuming from %s (step %d)", checkpoint, checkpoint_step(checkpoint))
    return str(checkpoint)


def stop_if_interrupted(trainer: Trainer, cfg: DictConfig, run_dir: RunDir) -> None:
    """After trainer.train(): a signal -> RunInterrupted, the watchdog -> TrainingDiverged; both come after a checkpoint was saved.

    The run then ends without the final eval and save; plots/loss.png shows the steps done so far.
    """
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, InterruptGuard))
    watchdog = next((c for c in trainer.callback_handler.callbacks if isinstance(c, LossWatchdog)), None)
    if guard.signum is None and (watchdog is None or watchdog.reason is None):
        return
    finish_plots(run_dir, f"{cfg.method.name} · {cfg.model.name} · {cfg.data.name} (stopped)")
    checkpoint = latest_checkpoint(run_dir.path)
    if guard.signum is not None:
        raise RunInterrupted(guard.signum, trainer.state.global_step, str(checkpoint) if checkpoint else None)
    raise TrainingDiverged(f"training stopped: {watchdog.reason}; the checkpoint is in {checkpoint}; lower method.learning_rate "
                           f"(now {cfg.method.learning_rate:g}) or check the data, or set watchdog.enabled=false.")


def evaluate_lm(trainer: Trainer) -> dict:
    """eval_loss and eval_perplexity on the eval split (empty dict without one)."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {"eval_loss": metrics["eval_loss"], "eval_perplexity": perplexity(metrics["eval_loss"])}


def plan(cfg: DictConfig, train_examples: int, tokens: int, model=None) -> dict:
    """Steps, tokens and (with the model) a memory estimate for the run, logged before training starts."""
    per_step = cfg.hardware.batch_size * cfg.hardware.grad_accum
    steps_per_epoch = max(1, math.ceil(train_examples / per_step))
    steps = cfg.method.max_steps if cfg.method.max_steps > 0 else math.ceil(steps_per_epoch * cfg.method.epochs)
    estimate = {"optimizer_steps": steps, "sequences_per_step": per_step,
                "planned_tokens": int(tokens * min(1.0, steps / steps_per_epoch) if cfg.method.max_steps > 0 else tokens * cfg.method.epochs)}
    if model is not None:
        memory = estimate_memory(model, cfg.hardware.batch_size, cfg.method.max_length, cfg.hardware.gradient_checkpointing)
        log.info("memory estimate: %.3g GB = weights %.3g GB (%s parameters, %s trainable) + gradients and AdamW state %.3g GB "
                 "+ activations ~%.3g GB (batch %d x at most %d tokens)", memory["total_gb"], memory["weights_gb"], f"{memory['parameters']:,}",
                 f"{memory['trainable_parameters']:,}", memory["gradients_gb"] + memory["optimizer_gb"], memory["activations_gb"],
                 cfg.hardware.batch_size, cfg.method.max_length)
        estimate["memory"] = memory
    return estimate


def estimate_memory(model, batch_size: int, seq_len: int, gradient_checkpointing: bool = False) -> dict:
    """A rough upper bound of training memory: weights + gradients + AdamW state (two fp32 values per trainable
    parameter) + activations at `seq_len` tokens per sequence (batches padded to their longest use less): per layer
    about 34 x batch x tokens x hidden bytes in 16-bit (Korthikanti et al. 2022, without the attention matrix that
    sdpa and flash-attention never store; twice that in fp32), one hidden state per layer with gradient checkpointing,
    plus the fp32 logits and their gradient."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    vocab = getattr(config, "vocab_size", 0) or 0
    width = next((p.element_size() for p in params if p.is_floating_point()), 4)
    tokens = batch_size * seq_len
    per_layer = tokens * hidden * width * (1 if gradient_checkpointing else 17)  # ~34 bytes/elem in fp16 (Korthikanti et al.)
    activations = layers * per_layer + 2 * tokens * vocab * 4
    gb = lambda b: round(b / 2**30, 4)  # noqa: E731
    out = {"parameters": sum(p.numel() for p in params), "trainable_parameters": n_trainable, "weights_gb": gb(weights),
           "gradients_gb": gb(gradients), "optimizer_gb": gb(8 * n_trainable), "activations_gb": gb(activations)}
    out["total_gb"] = round(out["weights_gb"] + out["gradients_gb"] + out["optimizer_gb"] + out["activations_gb"], 4)
    return out


def save_artefacts(run: RunDir, trainer: Trainer, tokenizer, template: Template, cfg: DictConfig) -> Path:
    """adapter/ (PEFT) or model/ (full weights), with the tokenizer and the chat template training used.

    Every rank takes part (sharded weights are gathered), rank 0 writes. A save that fails (a full disk,
    an unwritable folder) first rescues the weights to a temporary folder and says where they are.
    """
    is_adapter = cfg.lora.name != "none"
    out = run.artefact("adapter" if is_adapter else "model")
    try:
        _save(trainer, tokenizer, template, out, is_adapter)
    except OSError as e:
        rescue = Path(tempfile.mkdtemp(prefix=f"medgpt-rescue-{run.path.name}-"))
        try:
            _save(trainer, tokenizer, template, rescue, is_adapter)
            where = f"the trained weights were saved to {rescue} instead"
        except OSError:
            where = f"the last checkpoint under {run.checkpoints} (if any) is all that is left"
        raise ArtefactError(f"could not save the {out.name} to {out} ({e.strerror or e}); {where}.") from None
    log.info("saved %s to %s", out.name, out)
    return out


def _save(trainer: Trainer, tokenizer, template: Template, out: Path, is_adapter: bool) -> None:
    trainer.save_model(str(out))  # gathers sharded (FSDP / ZeRO-3) weights; writes on the main process only
    if not trainer.is_world_process_zero():
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle: checkpoints keep it, artefacts need not
    tokenizer.chat_template = template.to_jinja()
    tokenizer.save_pretrained(out)
    stop_ids = stop_token_ids(tokenizer, template)
    (out / SAVED_TEMPLATE).write_text(OmegaConf.to_yaml(OmegaConf.create(template.__dict__)))
    model = trainer.model
    if not is_adapter and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stop_ids
        model.generation_config.save_pretrained(out)


def peak_memory_gb() -> float | None:
    """The measured peak: CUDA max allocated, else this process' peak resident memory."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def finish_plots(run: RunDir, title: str) -> None:
    if run.is_main:
        plot_loss(MetricsWriter(run.metrics).rows(), run.loss_plot, title)
