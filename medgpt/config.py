"""Typed schemas behind the conf/ groups, and the cross-field rules that no schema can express.

Every group option under conf/ starts its defaults list with one of the schemas stored here
(`<group>_schema` or `<method>_schema`), so Hydra composes in struct mode: a misspelt key or a
value of the wrong type fails at compose time with the key's full name. `validate()` then checks
the rules that span groups (T4 has no bf16, QLoRA needs bitsandbytes, ...) before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medgpt.errors import ConfigError

MODES = ("train", "serve", "chat", "predict", "merge", "eval", "compare", "webui")


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run directory names
    name_or_path: str = MISSING  # an embedded name (tiny, smollm2-135m), a local directory, or a hub id
    template: str = "auto"  # chat template when template=auto: a conf/template name, or auto (the tokenizer's own)
    target_modules: Optional[list[str]] = None  # LoRA targets for this architecture; null = all linear layers
    revision: Optional[str] = None
    trust_remote_code: bool = False  # runs code shipped with the model: only for sources you trust
    init_from: Optional[str] = None  # a finished run directory to start from (its merged model, or base + adapter)


@dataclass
class DataConfig:
    name: str = MISSING
    train_files: list[str] = MISSING  # paths or globs, relative to the project root
    eval_files: list[str] = field(default_factory=list)
    eval_split: float = 0.0  # fraction of train held out for eval when eval_files is empty
    format: str = "auto"  # auto | sharegpt | messages | alpaca | text | preference
    columns: dict[str, str] = field(default_factory=dict)  # rename fields: {our_name: their_name}
    max_samples: Optional[int] = None  # keep the first N training records (eval: N // 4, at least 8)
    on_error: str = "fail"  # fail | skip: what a malformed record does
    system_prompt: Optional[str] = None  # used for records that bring no system turn


@dataclass
class MethodConfig:
    name: str = MISSING
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    max_length: int = 512  # tokens per example (higher = more memory)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    group_by_length: bool = True  # batch examples of similar length: less padding (1.5x faster on the demo data)
    logging_steps: int = 1
    eval_steps: int = 50  # 0 = evaluate only at the start and the end
    save_steps: int = 0  # 0 = no intermediate checkpoints
    save_total_limit: int = 2
    sample_questions: int = 1  # held-out questions answered before and after training (0 = none)
    sample_max_new_tokens: int = 64
    early_stopping_patience: int = 0  # stop after this many evaluations without a lower eval loss (0 = off; needs eval_steps > 0)


@dataclass
class SFTMethodConfig(MethodConfig):
    train_on_inputs: bool = False  # true = also train on system/user tokens
    packing: bool = False  # pack several examples per row (position ids keep them apart)


@dataclass
class PTMethodConfig(MethodConfig):
    packing: bool = True
    drop_last_block: bool = False


@dataclass
class DPOMethodConfig(MethodConfig):
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust | orpo | simpo
    label_smoothing: float = 0.0
    reference: str = "auto"  # auto | base | <run dir>
    sft_weight: float = 0.0
    precompute_reference: bool = False  # reference log-probs computed once before training (no reference forward per step)
    max_prompt_length: int = 256
    simpo_gamma: float = 0.5  # SimPO's target reward margin


@dataclass
class LoraConfig:
    name: str = MISSING  # none | lora | qlora | dora
    r: int = 16  # adapter rank (higher = more capacity and memory)
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # null = model.target_modules, else all linear layers
    modules_to_save: Optional[list[str]] = None
    use_dora: bool = False
    quantization: Optional[str] = None  # null | 4bit (QLoRA: NF4 + double quant) | 8bit


@dataclass
class DeepSpeedConfig:
    name: str = MISSING  # none | zero1 | zero2 | zero3 | zero3_offload
    zero_stage: int = 0  # 0 = DeepSpeed off
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    batch_size: int = 4
    eval_batch_size: int = 8
    grad_accum: int = 1
    gradient_checkpointing: bool = False  # less memory, about 30% slower
    num_workers: int = 0


@dataclass
class TemplateConfig:
    """A chat template as data. Each field is a format with `{content}` (see medgpt/data/templates.py)."""

    name: str = MISSING  # auto = model.template, or the tokenizer's own chat template
    prefix: str = ""
    system: str = ""
    user: str = ""
    assistant_start: str = ""
    assistant: str = ""
    assistant_end: str = ""
    stop: str = ""
    default_system: Optional[str] = None
    system_position: str = "turn"  # turn | first_user


@dataclass
class LoggerConfig:
    name: str = MISSING  # none | wandb | tensorboard (metrics.jsonl is always written)
    project: str = "medgpt"  # W&B project
    entity: Optional[str] = None  # W&B team or user (null = your default entity)
    group: Optional[str] = None  # W&B group: the sweep a job belongs to (conf/logger/wandb.yaml)
    tags: list[str] = field(default_factory=list)  # W&B tags: the group choices (conf/logger/wandb.yaml)


@dataclass
class GenerationConfig:
    """Sampling defaults for chat, predict, serve and webui (requests may override them)."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: Optional[int] = None


@dataclass
class ServeConfig:
    engine: str = "hf"  # hf (transformers; batches concurrent requests) | vllm (GPU, pip install 'medgpt[gpu]')
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the server to the network: set api_key then
    port: int = 8000
    api_key: Optional[str] = None  # bearer key required on /v1/* (env MEDGPT_API_KEY works too)
    model_name: Optional[str] = None  # the id shown in /v1/models (default: the run's name)
    max_batch_size: int = 8  # requests generated together in one batch (hf engine)
    batch_wait_ms: int = 20  # how long the first request waits for others to join its batch
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    webui_port: int = 7860
    max_upload_kb: int = 200  # size limit of a document uploaded in the web UI
    gpu_memory_utilization: float = 0.85  # vllm


@dataclass
class PredictConfig:
    input: Optional[str] = None  # .txt (one prompt per line) or .jsonl (prompt | messages | conversations)
    output: Optional[str] = None  # .jsonl; rows already there are skipped (resumable)
    batch_size: int = 8


@dataclass
class MergeConfig:
    dtype: str = "auto"  # auto (the training dtype) | fp32 | fp16 | bf16
    parity_prompts: int = 3  # greedy outputs compared between adapter and merged model


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["pt", "sft", "dpo"])
    data: dict[str, str] = field(default_factory=lambda: {"pt": "pretrain_demo", "sft": "medical_demo", "dpo": "dpo_demo"})
    overrides: dict[str, list[str]] = field(default_factory=dict)  # extra overrides per stage, e.g. {dpo: [method.beta=0.2]}
    merge: bool = True  # merge the last stage's adapter at the end


@dataclass
class WatchdogConfig:
    """Stops a run whose loss is not finite, or spikes for several steps, with a checkpoint and one sentence."""

    enabled: bool = True
    threshold: float = 2.0  # a spike: a loss this far above the median of the recent losses (2 nats = 7x the perplexity)
    patience: int = 3  # consecutive spiking logging steps before stopping (a NaN/Inf loss stops at once)
    window: int = 20  # how many recent losses the median looks at


@dataclass
class SweepConfig:
    """What a multirun sweep optimises: run() returns summary[metric] (Optuna reads it, sweep_summary marks the best)."""

    metric: str = "eval_loss"  # a summary.json key: eval_loss | train_loss | eval_reward_accuracy | ...
    direction: str = "minimize"  # minimize | maximize


@dataclass
class CompareConfig:
    """mode=compare run=<sweep dir | folder of runs | [dirA,dirB]>: a table of runs and their loss curves."""

    sort_by: str = "eval_loss"  # a metric column (train_loss, eval_loss, wall_time_s, steps) or a differing config key
    descending: bool = False
    output: Optional[str] = None  # folder for comparison.md / comparison_loss.png (null: the compared folder; a list: the folder the runs share)


@dataclass
class PathsConfig:
    root: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    mode: str = "train"
    run: Any = None  # a finished run directory, or latest, for modes that read one (mode=compare: also a list)
    resume: bool = False  # with run=<dir>: continue an interrupted run from its last checkpoint, in the same directory
    seed: int = 42
    tag: Optional[str] = None  # appended to the run directory name
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING  # one of the *MethodConfig schemas, chosen by method=<name>
    lora: LoraConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    hardware: HardwareConfig = MISSING
    template: TemplateConfig = MISSING
    logger: LoggerConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def _sweep_group() -> Optional[str]:
    """`${medgpt_sweep:}`: in a multirun, the sweep's id (multirun-<date>-<time>) for W&B groups; null in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    return f"{sweep_dir.parent.parent.name}-{sweep_dir.parent.name}-{sweep_dir.name}"


def _run_dir(new_dir: str, resume: Any, run: Any, output_dir: str) -> str:
    """`hydra.run.dir`: resume=true continues run=<dir> in place (its train.log goes on); otherwise `new_dir`."""
    if resume is not True or not run:
        return new_dir
    from medgpt.tracking.rundir import resolve_run

    try:
        return str(resolve_run(str(run), Path(output_dir), status="interrupted").resolve())
    except ConfigError:
        return new_dir  # run.py says what is wrong in one sentence


def _dirname(overrides: str) -> str:
    """`${medgpt_dirname:...}`: a sweep job's overrides as ONE folder name: paths keep their last part
    (data.train_files=[a/b/train.jsonl] -> data.train_files=[train.jsonl]), at most 200 characters."""
    name = re.sub(r"[^,=\[\]]*[/\\]", "", str(overrides))
    return name if len(name) <= 200 else name[:191] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register medgpt's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("medgpt_tag", lambda tag: f"-{tag}" if tag else "", replace=True)
    # run directories are named by what they hold: the method for training, else the mode (serve, chat, ...)
    OmegaConf.register_new_resolver("medgpt_job", lambda mode, method: method if mode == "train" else mode, replace=True)
    OmegaConf.register_new_resolver("medgpt_sweep", _sweep_group, replace=True)
    OmegaConf.register_new_resolver("medgpt_run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("medgpt_dirname", _dirname, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("lora", LoraConfig),
        ("deepspeed", DeepSpeedConfig),
        ("hardware", HardwareConfig),
        ("template", TemplateConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    for name, node in [("pt", PTMethodConfig), ("sft", SFTMethodConfig), ("dpo", DPOMethodConfig), ("method", MethodConfig)]:
        cs.store(group="method", name=f"{name}_schema", node=node)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}.")


GROUP_SCHEMAS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "deepspeed": DeepSpeedConfig,
                 "hardware": HardwareConfig, "template": TemplateConfig, "logger": LoggerConfig}
METHOD_SCHEMAS = {"pt": PTMethodConfig, "sft": SFTMethodConfig, "dpo": DPOMethodConfig}


def check_known_keys(cfg: DictConfig) -> None:
    """Keys forced in with `+group.key=...` bypass struct mode; refuse them here instead of ignoring them."""
    schemas = dict(GROUP_SCHEMAS, method=METHOD_SCHEMAS.get(cfg.method.name, MethodConfig))
    for group, schema in schemas.items():
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(cfg[group].keys()) - known)
        if unknown:
            raise ConfigError(f"unknown key {group}.{unknown[0]} (known: {', '.join(sorted(known))}).")


def validate(cfg: DictConfig) -> None:
    """Cross-field rules; raises ConfigError with one sentence naming the keys involved."""
    _choice("mode", cfg.mode, MODES)
    check_known_keys(cfg)
    if cfg.mode != "train":
        return
    m, hw, lora, data = cfg.method, cfg.hardware, cfg.lora, cfg.data
    _choice("hardware.dtype", hw.dtype, ("auto", "fp32", "fp16", "bf16"))
    _choice("hardware.device", hw.device, ("auto", "cpu", "cuda", "mps"))
    _choice("hardware.attn_implementation", hw.attn_implementation, ("auto", "sdpa", "eager", "flash_attention_2"))
    _choice("data.format", data.format, ("auto", "sharegpt", "messages", "alpaca", "text", "preference"))
    _choice("data.on_error", data.on_error, ("fail", "skip"))
    _choice("lora.name", lora.name, ("none", "lora", "qlora", "dora"))
    _choice("lora.quantization", lora.quantization, (None, "4bit", "8bit"))
    _choice("template.system_position", cfg.template.system_position, ("turn", "first_user"))
    if hw.name == "t4" and hw.dtype == "bf16":
        raise ConfigError("hardware=t4 has no bf16 support: use hardware.dtype=fp16 (or fp32).")
    if hw.device == "cpu" and hw.dtype == "fp16":
        raise ConfigError("hardware.dtype=fp16 needs a GPU: use fp32 or bf16 on the CPU.")
    if lora.quantization and lora.name == "none":
        raise ConfigError("lora.quantization needs an adapter: use lora=qlora (or lora=lora with lora.quantization).")
    if lora.quantization and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.49'.")
    if lora.quantization and cfg.deepspeed.zero_stage == 3:
        raise ConfigError("QLoRA (lora.quantization) cannot be combined with deepspeed=zero3: use zero2 or none.")
    if lora.r <= 0 or lora.alpha <= 0:
        raise ConfigError(f"lora.r and lora.alpha must be positive (got r={lora.r}, alpha={lora.alpha}).")
    if not 0.0 <= data.eval_split < 1.0:
        raise ConfigError(f"data.eval_split must be in [0, 1) (got {data.eval_split}).")
    if m.max_length < 16:
        raise ConfigError(f"method.max_length={m.max_length} is too short: use at least 16 tokens.")
    if m.learning_rate <= 0:
        raise ConfigError(f"method.learning_rate must be positive (got {m.learning_rate}).")
    if m.epochs <= 0 and m.max_steps <= 0:
        raise ConfigError("set method.epochs > 0 or method.max_steps > 0.")
    _choice("sweep.direction", cfg.sweep.direction, ("minimize", "maximize"))
    if m.get("early_stopping_patience", 0) < 0 or cfg.watchdog.patience < 1 or cfg.watchdog.threshold <= 0:
        raise ConfigError("method.early_stopping_patience must be >= 0, watchdog.patience >= 1 and watchdog.threshold > 0.")
    if m.name == "dpo":
        _choice("method.loss", m.loss, ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo"))
        if not 0.0 <= m.label_smoothing < 0.5:
            raise ConfigError(f"method.label_smoothing must be in [0, 0.5) (got {m.label_smoothing}).")
