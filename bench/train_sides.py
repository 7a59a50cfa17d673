"""Training sides of `make bench`: medgpt's SFT / DPO / PT stages and their peers, each measured the same way.

medgpt's side composes the config a user gets (`python launch.py <overrides>`, composed in-process as
tests/conftest.py does) and runs the stage's own code path: prepare -> the stage's data (tokenised-data cache) ->
build_model (LoRA) -> the stage's training parts (collator, sampler, Trainer class) -> make_trainer -> train().
The peers get the same model folder, the same tokenised rows (medgpt's data, so every side trains on exactly the
same tokens and labels; the default-vs-default row is the exception: TRL tokenises the dialogues itself, as a user
of TRL gets it), the same LoRA (r, alpha, targets, dropout), batch size, learning rate, schedule and steps, and the
same dtype: fp32 on both sides, or bf16 autocast on both sides (`bf16=True`; medgpt `hardware.dtype=bf16`), except the
default-vs-default row, where each side runs the precision its defaults give (medgpt `hardware=auto`, TRL's SFTConfig
bf16=True). Each measurement records the precision it actually ran (`precision`: frozen and trained weight dtypes,
autocast), read from the Trainer and its model.

What is counted, the same way on every side: a forward pre-hook on the trained model counts the non-padding tokens of
every training forward (attention_mask.sum(), or every position of a padding-free / packed row, which has none);
a TrainerCallback times the training loop (on_train_begin -> on_train_end). Tokens/s = tokens / loop seconds.
DPO counts pairs: optimiser steps x batch, over the loop seconds plus the reference precomputation when a side
does one (precomputing is part of what that side pays for its steps; the data is capped at steps x batch pairs,
so no side precomputes pairs it never trains on).
Supports: the factories named in bench/run.py (each returns `measure()` -> {"value", ...}).
Writes: only temporary folders (removed).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import scratch  # noqa: E402


def compose(overrides: list[str]):
    """The config `python launch.py <overrides>` composes (mode=train), with paths.root set to the project."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from medgpt.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="config", overrides=[f"paths.root={ROOT}", *overrides])


def meter():
    """A TrainerCallback that times the training loop and counts non-padding tokens of training forwards."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.tokens, self.started, self.seconds, self.steps = 0, 0.0, 0.0, 0
            self.hooked = None

        def hook(self, model) -> None:
            def count(module, args, kwargs):
                if not module.training:
                    return
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                if mask is not None and mask.dim() == 2:
                    self.tokens += int(mask.sum())
                elif ids is not None:
                    self.tokens += ids.numel()  # padding-free / packed: every position is a token

            self.hooked = model.register_forward_pre_hook(count, with_kwargs=True)

        def on_train_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.started
            self.steps = state.global_step

    return Meter()


def precision(trainer) -> str:
    """What a side really ran: e.g. "frozen bfloat16, trained float32, bf16 autocast" (read from the Trainer, not the config)."""
    def dtypes(trains: bool) -> str:
        found = {str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters() if p.requires_grad == trains}
        return "/".join(sorted(found)) or "none"

    amp = "bf16 autocast" if trainer.args.bf16 else "fp16 autocast" if trainer.args.fp16 else "no autocast"
    return f"frozen {dtypes(False)}, trained {dtypes(True)}, {amp}"


def timed_train(trainer, model, extra_seconds: float = 0.0, pairs_per_step: int | None = None) -> dict:
    ran = precision(trainer)
    m = meter()
    m.hook(model)
    trainer.add_callback(m)
    trainer.train()
    m.hooked.remove()
    seconds = m.seconds + extra_seconds
    if pairs_per_step:
        return {"value": m.steps * pairs_per_step / seconds, "pairs": m.steps * pairs_per_step, "seconds": round(seconds, 3),
                "steps": m.steps, "precompute_seconds": round(extra_seconds, 3), "precision": ran}
    return {"value": m.tokens / seconds, "tokens": m.tokens, "seconds": round(seconds, 3), "steps": m.steps, "precision": ran}


def gemm_gflops(dtype: str = "fp32", n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` n x n x n matrix products, in GFLOP/s (2 n^3 FLOP each)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# --- medgpt -----------------------------------------------------------------------------------------------------

def medgpt_stage(overrides: list[str], unit: str = "tokens", gemm: bool = False):
    """medgpt's stage (method=... in overrides) as `launch.py` runs it, minus the evaluations, saving and plots."""
    from medgpt.stages.lifecycle import Context, language_model_parts
    from medgpt.stages.protocol import methods
    from medgpt.stages.training import build_model, make_trainer, prepare
    from medgpt.tracking.rundir import RunDir

    cfg = compose(overrides)
    stage = methods()[cfg.method.name]
    tmp = Path(scratch("medgpt-bench-"))
    ctx = Context(cfg, RunDir(tmp / "run", rank=0), stage)
    ctx.setup = prepare(cfg)
    ctx.data = stage.build_data(ctx)  # tokenised once (and cached); every repetition trains on the same rows
    n_params = None

    def measure() -> dict:
        nonlocal n_params
        ctx.model = stage.build_model(ctx) if stage.build_model else build_model(cfg, ctx.setup)
        started = time.perf_counter()
        ctx.parts = stage.training_parts(ctx) if stage.training_parts else language_model_parts(ctx)
        precompute = time.perf_counter() - started if cfg.method.get("precompute_reference") else 0.0
        trainer = make_trainer(cfg, ctx.run, ctx.setup, ctx.model, ctx.parts, perplexity=stage.perplexity)
        out = timed_train(trainer, trainer.model, precompute, cfg.hardware.batch_size if unit == "pairs" else None)
        if gemm:
            base = ctx.model.get_base_model() if hasattr(ctx.model, "get_base_model") else ctx.model
            n_params = n_params or sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
            out.update(gemm_gflops=gemm_gflops("fp32"), n_params=n_params)
        return out

    return measure


# --- peers (shared set-up: medgpt's tokenised rows, the same model folder and LoRA) -----------------------------

def _shared(overrides: list[str]):
    from medgpt.stages.lifecycle import Context
    from medgpt.stages.protocol import methods
    from medgpt.stages.training import prepare
    from medgpt.tracking.rundir import RunDir

    cfg = compose(overrides)
    stage = methods()[cfg.method.name]
    ctx = Context(cfg, RunDir(Path(scratch("medgpt-bench-")) / "run", rank=0), stage)
    ctx.setup = prepare(cfg)
    return cfg, ctx


def _lora(cfg):
    from peft import LoraConfig

    from medgpt.modeling.adapters import target_modules

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=target_modules(cfg.lora, cfg.model), task_type="CAUSAL_LM")


def _model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def _common_args(cfg, out: str, bf16: bool = False) -> dict:
    """The Trainer settings every peer shares with medgpt's composed config; `bf16`: CPU bf16 autocast (medgpt hardware.dtype=bf16)."""
    m, hw = cfg.method, cfg.hardware
    return dict(output_dir=out, per_device_train_batch_size=hw.batch_size, gradient_accumulation_steps=1, max_steps=m.max_steps,
                learning_rate=m.learning_rate, lr_scheduler_type=m.lr_scheduler, warmup_steps=m.warmup_ratio,
                weight_decay=m.weight_decay, max_grad_norm=m.max_grad_norm, logging_steps=m.max_steps, save_strategy="no",
                eval_strategy="no", report_to="none", use_cpu=True, bf16=bf16, fp16=False, seed=cfg.seed, data_seed=cfg.seed,
                disable_tqdm=True,
                # medgpt's own setting (off): TRL 1.16's SFTConfig and DPOConfig turn it on by default, which trades ~30%
                # speed for memory; a peer in its fastest configuration runs without it
                gradient_checkpointing=cfg.hardware.gradient_checkpointing)


def trl_sft(overrides: list[str], variant: str, bf16: bool = False):
    """TRL's SFTTrainer on medgpt's tokenised rows: variant grouped | padding_free | packing | padded; `bf16`: bf16=True
    (fp32 weights, CPU bf16 autocast: TRL's own way to train in bf16, its default model dtype being fp32)."""
    from trl import SFTConfig, SFTTrainer

    cfg, ctx = _shared(overrides)
    data = ctx.stage.build_data(ctx)
    train = data.train.select_columns(["input_ids", "labels"])
    # padding_free without packing: TRL refuses a max_length it would not enforce; medgpt's rows are already cut to it
    flags = {"grouped": {"train_sampling_strategy": "group_by_length"}, "padding_free": {"padding_free": True, "max_length": None},
             "packing": {"packing": True, "packing_strategy": "bfd"}, "padded": {}}[variant]

    def measure() -> dict:
        args = SFTConfig(**{**_common_args(cfg, scratch("trl-bench-"), bf16), "max_length": cfg.method.max_length, **flags})
        trainer = SFTTrainer(model=_model(ctx.setup.model_path), args=args, train_dataset=train, processing_class=ctx.setup.tokenizer,
                             peft_config=_lora(cfg))
        return timed_train(trainer, trainer.model)

    return measure


def trl_sft_default(overrides: list[str], steps: int):
    """TRL's SFTTrainer as its documentation starts a user: conversational data ({"messages"}), SFTConfig defaults
    (batch 8, max_length 1024, no grouping, loss on every token, gradient checkpointing on, bf16=True: fp32 weights
    under CPU bf16 autocast, trl 1.16), the model's own chat template. use_cpu=True is the one setting a CPU needs:
    without it TrainingArguments refuses bf16=True where no GPU supports it. The model is loaded in fp32, what
    SFTTrainer(model=<path>) loads by default. Not timed or counted differently: report_to, saving, tqdm, logging."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from medgpt.data.loading import load_train_eval

    cfg, ctx = _shared(overrides)
    records, _, _ = load_train_eval(cfg.data, ROOT, cfg.seed)
    train = Dataset.from_list([{"messages": [{"role": m["role"], "content": m["content"]} for m in r.messages]} for r in records])

    def measure() -> dict:
        args = SFTConfig(output_dir=scratch("trl-bench-"), max_steps=steps, report_to="none", save_strategy="no",
                         use_cpu=True, disable_tqdm=True, logging_steps=steps)
        trainer = SFTTrainer(model=_model(ctx.setup.model_path), args=args, train_dataset=train, processing_class=ctx.setup.tokenizer,
                             peft_config=_lora(cfg))
        return timed_train(trainer, trainer.model)

    return measure


def padded_trainer(overrides: list[str]):
    """What MedicalGPT's supervised_finetuning.py runs: transformers' Trainer + DataCollatorForSeq2Seq (padded to the
    longest row of each batch), random batches (no length grouping), the LoRA model from peft.get_peft_model."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    cfg, ctx = _shared(overrides)
    data = ctx.stage.build_data(ctx)
    train = data.train.select_columns(["input_ids", "labels"])
    collator = DataCollatorForSeq2Seq(ctx.setup.tokenizer, padding=True, label_pad_token_id=-100)

    def measure() -> dict:
        model = get_peft_model(_model(ctx.setup.model_path), _lora(cfg))
        args = TrainingArguments(**_common_args(cfg, scratch("hf-bench-")), train_sampling_strategy="random")
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
        return timed_train(trainer, trainer.model)

    return measure


def run_clm(overrides: list[str]):
    """transformers' examples/pytorch/language-modeling/run_clm.py recipe: tokenise every document, concatenate
    them all, cut into blocks of max_length (group_texts; the remainder dropped), labels = input_ids, Trainer with
    default_data_collator. Same documents as medgpt (its training split of data.train_files)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from medgpt.data.loading import load_train_eval

    cfg, ctx = _shared(overrides)
    records, _, _ = load_train_eval(cfg.data, ROOT, cfg.seed)
    tok, block = ctx.setup.tokenizer, cfg.method.max_length
    ids = [t for r in records for t in tok(r.text)["input_ids"]]
    n = len(ids) // block * block
    blocks = [ids[i:i + block] for i in range(0, n, block)]
    train = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [b[:] for b in blocks]})

    def measure() -> dict:
        model = get_peft_model(_model(ctx.setup.model_path), _lora(cfg))
        args = TrainingArguments(**_common_args(cfg, scratch("hf-bench-")))
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
        return timed_train(trainer, trainer.model)

    return measure


def trl_dpo(overrides: list[str], precompute: bool):
    """TRL's DPOTrainer on the same pairs (conversational prompt / chosen / rejected, rendered by medgpt's template as
    the tokenizer's chat template), sigmoid loss, the same beta, reference = the policy with its adapter disabled."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from medgpt.data.loading import load_train_eval

    cfg, ctx = _shared(overrides)
    records, _, _ = load_train_eval(cfg.data, ROOT, cfg.seed)
    tokenizer = ctx.setup.tokenizer
    tokenizer.chat_template = ctx.setup.template.to_jinja()
    train = Dataset.from_list([{"prompt": [{"role": m["role"], "content": m["content"]} for m in r.messages],
                                "chosen": [{"role": "assistant", "content": r.chosen}],
                                "rejected": [{"role": "assistant", "content": r.rejected}]}
                               for r in records if r.chosen.strip() != r.rejected.strip()])

    class Timed(DPOTrainer):
        precompute_seconds = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                Timed.precompute_seconds += time.perf_counter() - started

    def measure() -> dict:
        Timed.precompute_seconds = 0.0
        args = DPOConfig(**_common_args(cfg, scratch("trl-bench-")), beta=cfg.method.beta, loss_type=["sigmoid"],
                         max_length=cfg.method.max_length, precompute_ref_log_probs=precompute, dataset_num_proc=None)
        trainer = Timed(model=_model(ctx.setup.model_path), args=args, train_dataset=train, processing_class=tokenizer,
                        peft_config=_lora(cfg))
        return timed_train(trainer, trainer.model, Timed.precompute_seconds, cfg.hardware.batch_size)

    return measure
