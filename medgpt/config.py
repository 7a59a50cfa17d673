"""Typed schemas behind the conf/ groups, the limits of their values, and the cross-field rules.

Every group option under conf/ starts its defaults list with one of the schemas stored here
(`<group>_schema` or `<method>_schema`), so Hydra composes in struct mode: a misspelt key or a
value of the wrong type fails at compose time with the key's full name. Each number and each
closed choice carries its limits on the schema field (`bounded(...)`, `choice(...)`); `validate()`
checks them with `check_values()`, then the rules that span fields (T4 has no bf16, QLoRA needs
bitsandbytes, ...) before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medgpt.errors import ConfigError

MODES = ("train", "serve", "chat", "predict", "merge", "eval", "compare", "webui", "export", "preview")
# transformers' SchedulerType values (kept here as data: composing a config imports no transformers)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
                 "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MAX_SEED = 2**32 - 1  # numpy's limit (transformers.set_seed seeds numpy too)


@dataclass(frozen=True)
class Limits:
    """The values a schema field accepts: bounds (ge/gt/le/lt, plus `also` values outside them) or a closed choice.

    None always passes: an Optional field left unset is not a value to check.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    also: tuple = ()  # accepted besides the bounds, e.g. method.max_steps=-1 (off)
    options: tuple = ()  # a closed choice
    registry: Optional[str] = None  # "module:function" returning the choice's names (a registry, e.g. serving engines)
    hint: str = ""  # said after a refused choice: what to do instead (e.g. how to get a value medgpt cannot produce)

    def names(self) -> tuple:
        """The closed choice: `options`, or what the registry holds now (read on every check, so a registered name counts)."""
        if self.registry is None:
            return self.options
        module, _, function = self.registry.partition(":")
        return tuple(getattr(importlib.import_module(module), function)())

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is refused (the sentence after `key=value`), or None when it is accepted."""
        if value is None or value in self.also:
            return None
        if self.options or self.registry:
            names = self.names()
            return None if value in names else f"is not one of {', '.join(map(str, names))}." + (f" {self.hint}" if self.hint else "")
        rules = [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]
        # written as `not (value >= bound)`, so NaN is refused too
        passes = {">=": lambda b: value >= b, ">": lambda b: value > b, "<=": lambda b: value <= b, "<": lambda b: value < b}
        if all(passes[op](bound) for op, bound in rules if bound is not None):
            return None
        rule = " and ".join(f"{op} {bound if isinstance(bound, int) else format(bound, 'g')}" for op, bound in rules if bound is not None)
        also = f" (or {', '.join(map(str, self.also))})" if self.also else ""
        return f"is invalid: it must be {rule}{also}."


def _limited_field(default: Any, limits: Limits) -> Any:
    """A dataclass field carrying `limits` in its metadata (OmegaConf ignores metadata: struct mode is unchanged)."""
    if default != MISSING and limits.problem(default):
        raise ValueError(f"schema default {default!r} {limits.problem(default)}")
    return field(default=default, metadata={"limits": limits})


def bounded(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
            lt: Optional[float] = None, also: tuple = ()) -> Any:
    """A schema field with numeric limits: `batch_size: int = bounded(4, ge=1)`; `also` lists accepted values outside them."""
    return _limited_field(default, Limits(ge=ge, gt=gt, le=le, lt=lt, also=also))


def choice(default: Any, *options: Any, hint: str = "") -> Any:
    """A schema field that takes one of `options` (the default among them, or MISSING/None): `choice("hf", "hf", "vllm")`;
    `hint` is said after a refusal."""
    return _limited_field(default, Limits(options=options, hint=hint))


def registered(default: Any, registry: str) -> Any:
    """A schema field that takes a name a registry holds, read when checked: `registered("hf", "medgpt.serving.engine:engine_names")`."""
    return _limited_field(default, Limits(registry=registry))


def unchecked(default: Any, reason: str) -> Any:
    """A str field with no closed set of values (a path, a run directory, free text), with the reason: declared where
    the field is, so a method module needs no list kept elsewhere (tests/test_config_values.py accepts these)."""
    return dataclasses.field(default=default, metadata={"unchecked": reason})


def limits_of(f: dataclasses.Field) -> Optional[Limits]:
    """The limits a schema field declares (None for free-form fields: names, paths, texts)."""
    return f.metadata.get("limits")


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in run directory names
    name_or_path: str = MISSING  # an embedded name (tiny, smollm2-135m), a local directory, or a hub id
    template: str = "auto"  # chat template when template=auto: a conf/template name, or auto (the tokenizer's own)
    target_modules: Optional[list[str]] = None  # LoRA targets for this architecture; null = all linear layers
    revision: Optional[str] = None
    trust_remote_code: bool = False  # runs code shipped with the model: only for sources you trust
    init_from: Optional[str] = None  # a finished run directory to start from (its merged model, or base + adapter)
    # vocabulary extension (medgpt/modeling/vocab.py): tokens added to the tokenizer, their rows trained (pt, sft)
    add_tokens: list[str] = field(default_factory=list)
    add_tokens_file: Optional[str] = unchecked(None, "a path: one token per line")
    # RoPE scaling applied at load (medgpt/modeling/rope.py): null | linear | dynamic | yarn, by rope_factor
    rope_scaling: Optional[str] = choice(None, "linear", "dynamic", "yarn")
    rope_factor: float = bounded(2.0, gt=1)


@dataclass
class DataConfig:
    name: str = MISSING
    train_files: list[str] = MISSING  # paths or globs, relative to the project root
    eval_files: list[str] = field(default_factory=list)
    eval_split: float = bounded(0.0, ge=0, lt=1)  # fraction of train held out for eval when eval_files is empty
    format: str = registered("auto", "medgpt.data.formats:format_choices")  # auto or a registered data format
    columns: dict[str, str] = field(default_factory=dict)  # rename fields: {our_name: their_name}
    max_samples: Optional[int] = bounded(None, ge=1)  # keep the first N records of each source (eval: N // 4, at least 8)
    # {training source name: weight or count} (medgpt/data/sources.py); untyped so that `data.mix={a: 3, b: 1}` replaces
    # it (a typed dict refuses new keys on the command line); its values are checked when the sources are known
    mix: Any = None
    mix_by: str = choice("weight", "weight", "count")  # weight: the named sources share their total; count: records each
    on_error: str = choice("fail", "fail", "skip")  # what a malformed record does: fail, or skip it (and count it)
    system_prompt: Optional[str] = None  # used for records that bring no system turn
    num_proc: int = bounded(0, ge=0)  # tokenisation worker processes; 0 = auto (1 for small data)


@dataclass
class MethodConfig:
    name: str = MISSING
    learning_rate: float = bounded(2e-4, gt=0)
    epochs: float = bounded(1.0, gt=0)
    max_steps: int = bounded(-1, gt=0, also=(-1,))  # > 0 overrides epochs; -1 = off
    max_length: int = bounded(512, ge=16)  # tokens per example (higher = more memory)
    warmup_ratio: float = bounded(0.05, ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    lr_scheduler: str = choice("cosine", *LR_SCHEDULERS)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0 = no gradient clipping
    group_by_length: bool = True  # batch examples of similar length: less padding (1.5x faster on the demo data)
    shuffle: bool = True  # false = the data's own order (and no length grouping): reproducible batches, e.g. to compare runs
    logging_steps: int = bounded(1, ge=1)
    eval_steps: int = bounded(50, ge=0)  # 0 = evaluate only at the start and the end
    save_steps: int = bounded(0, ge=0)  # 0 = no intermediate checkpoints
    save_total_limit: int = bounded(2, ge=1)
    sample_questions: int = bounded(1, ge=0)  # held-out questions answered before and after training (0 = none)
    sample_max_new_tokens: int = bounded(64, ge=1)
    # stop after this many evaluations without a lower eval loss (0 = off; needs eval_steps > 0)
    early_stopping_patience: int = bounded(0, ge=0)
    # NEFTune (Jain et al. 2023): uniform noise of alpha / sqrt(tokens x hidden) on the input embeddings while training; null = off
    neftune_noise_alpha: Optional[float] = bounded(None, gt=0)
    # the LM head and cross-entropy only where a label is, in chunks (medgpt.stages.token_loss); false = the model's full logits
    fused_loss: bool = True


@dataclass
class LoraConfig:
    name: str = choice(MISSING, "none", "lora", "qlora", "dora")
    r: int = bounded(16, ge=1)  # adapter rank (higher = more capacity and memory)
    alpha: int = bounded(32, ge=1)
    dropout: float = bounded(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None  # null = model.target_modules, else all linear layers
    modules_to_save: Optional[list[str]] = None
    use_dora: bool = False
    quantization: Optional[str] = choice(None, "4bit", "8bit")  # null | 4bit (QLoRA: NF4 + double quant) | 8bit


@dataclass
class DeepSpeedConfig:
    name: str = MISSING  # none | zero1 | zero2 | zero3 | zero3_offload (a label: zero_stage and offload_* act)
    zero_stage: int = choice(0, 0, 1, 2, 3)  # 0 = DeepSpeed off
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = choice("auto", "auto", "cpu", "cuda", "mps")
    dtype: str = choice("auto", *DTYPES)
    attn_implementation: str = choice("auto", "auto", "sdpa", "eager", "flash_attention_2")
    batch_size: int = bounded(4, ge=1)
    eval_batch_size: int = bounded(8, ge=1)
    grad_accum: int = bounded(1, ge=1)
    gradient_checkpointing: bool = False  # less memory, about 30% slower
    num_workers: int = bounded(0, ge=0)


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
    system_position: str = choice("turn", "turn", "first_user", "last_user")
    tool_style: str = choice("plain", "plain", "hermes", "llama3", "mistral", "glm4", "none")  # medgpt/data/tool_render.py
    tool: str = ""  # a tool result's turn with {content}; empty = the user format


@dataclass
class LoggerConfig:
    name: str = choice(MISSING, "none", "wandb", "tensorboard")  # metrics.jsonl is always written
    project: str = "medgpt"  # W&B project
    entity: Optional[str] = None  # W&B team or user (null = your default entity)
    group: Optional[str] = None  # W&B group: the sweep a job belongs to (conf/logger/wandb.yaml)
    tags: list[str] = field(default_factory=list)  # W&B tags: the group choices (conf/logger/wandb.yaml)
    log_samples: bool = False  # also send the before/after sample answers and the data statistics (they may hold patient text)


@dataclass
class LauncherConfig:
    """How training processes start (conf/launcher); medgpt/launch/ runs it, the run directory is made once."""

    name: str = choice("local", "local", "torchrun")  # local (this process) | torchrun (torch's elastic launcher, one process per device)
    nproc_per_node: int = bounded(1, ge=1)  # processes per node: one per GPU; on CPU, processes with the gloo backend
    nnodes: int = bounded(1, ge=1)
    node_rank: int = bounded(0, ge=0)  # this node's rank, 0 .. nnodes - 1
    master_addr: str = "127.0.0.1"
    master_port: int = bounded(29500, ge=1, le=65535)
    rdzv_endpoint: Optional[str] = None  # host:port of the c10d rendezvous for multi-node (default master_addr:master_port)
    backend: str = choice("auto", "auto", "nccl", "gloo")  # auto = nccl on CUDA, gloo on CPU
    dry_run: bool = False  # print the commands (and the sbatch script under SLURM) instead of running them


@dataclass
class FSDPConfig:
    """Fully sharded data parallel (torch FSDP through the Trainer); needs launcher=torchrun to shard across processes."""

    name: str = choice("none", "none", "full_shard", "shard_grad_op")  # shard_grad_op: gradients + optimiser state only
    auto_wrap: str = choice("decoder_layer", "decoder_layer")  # wrap each decoder layer (transformer_based_wrap)
    cpu_offload: bool = False  # parameters in CPU memory between uses (least GPU memory, slowest)


@dataclass
class GenerationConfig:
    """Sampling defaults for chat, predict, serve and webui (requests may override them)."""

    max_new_tokens: int = bounded(256, ge=1)
    temperature: float = bounded(0.7, ge=0)  # 0 = greedy
    top_p: float = bounded(0.9, gt=0, le=1)
    top_k: int = bounded(50, ge=0)  # 0 = no top-k cut
    repetition_penalty: float = bounded(1.0, gt=0)
    seed: Optional[int] = bounded(None, ge=0, le=MAX_SEED)


@dataclass
class ServeConfig:
    # a registered engine (medgpt.serving.engine.ENGINES): hf (transformers; batches concurrent requests) | vllm (GPU, 'medgpt[gpu]')
    engine: str = registered("hf", "medgpt.serving.engine:engine_names")
    host: str = "127.0.0.1"  # 0.0.0.0 exposes the server to the network: set api_key then
    port: int = bounded(8000, ge=1, le=65535)
    api_key: Optional[str] = None  # bearer key required on /v1/* (env MEDGPT_API_KEY works too)
    model_name: Optional[str] = None  # the id shown in /v1/models (default: the run's name)
    max_batch_size: int = bounded(0, ge=1, also=(0,))  # requests decoded together; 0 = auto (from model size and memory, 8-64)
    batch_wait_ms: int = bounded(20, ge=0)  # how long the first request waits for others to join its batch
    max_tokens_limit: int = bounded(1024, ge=1)  # the largest max_tokens a request may ask for
    webui_port: int = bounded(7860, ge=1, le=65535)
    max_upload_kb: int = bounded(200, ge=1)  # size limit of a document uploaded in the web UI
    max_body_kb: int = bounded(1024, ge=1)  # API request bodies above this are refused with 413 before parsing
    gpu_memory_utilization: float = bounded(0.85, gt=0, le=1)  # vllm


@dataclass
class PredictConfig:
    input: Optional[str] = None  # .txt (one prompt per line) or .jsonl (prompt | messages | conversations)
    output: Optional[str] = None  # .jsonl; rows already there are skipped (resumable)
    batch_size: int = bounded(8, ge=1)


@dataclass
class MergeConfig:
    dtype: str = choice("auto", *DTYPES)  # auto (the training dtype) | fp32 | fp16 | bf16
    parity_prompts: int = bounded(3, ge=0)  # greedy outputs compared between adapter and merged model


@dataclass
class ExportConfig:
    """mode=export run=<dir>: the run's model as GGUF, a bitsandbytes folder or merged safetensors (medgpt/export/)."""

    format: str = choice("gguf", "gguf", "bnb", "merged")  # written to <run>/export/<format>/ with export_report.json
    # gguf tensor type; the gguf package cannot write K-quants (q4_k_m, ...): convert with llama.cpp's quantize for those
    gguf_type: str = choice("q8_0", "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0",
                            hint="K-quants (q4_k_m, q5_k_m, ...) cannot be written by the gguf package: export q8_0 or f16 and "
                                 "convert it with llama.cpp's llama-quantize.")
    bnb: str = choice("nf4", "nf4", "fp4", "int8")  # bitsandbytes type of export.format=bnb
    dtype: str = choice("auto", "auto", "fp16", "bf16", "fp32")  # export.format=merged (auto: bf16 if the run trained in bf16, else fp16)
    prompts: int = bounded(3, ge=1, le=8)  # fixed prompts the round trip compares (logits and greedy answers)
    max_new_tokens: int = bounded(16, ge=1)  # length of the greedy answers compared
    tolerance: Optional[float] = bounded(None, gt=0)  # largest logit difference accepted (null: the type's default)


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["pt", "sft", "dpo"])
    data: dict[str, str] = field(default_factory=lambda: {"pt": "pretrain_demo", "sft": "medical_demo", "dpo": "dpo_demo"})
    overrides: dict[str, list[str]] = field(default_factory=dict)  # extra overrides per stage, e.g. {dpo: [method.beta=0.2]}
    merge: bool = True  # merge the last stage's adapter at the end
    eval: list[str] = field(default_factory=list)  # suites evaluated on the starting model and after every stage, e.g. [mcq]


@dataclass
class WatchdogConfig:
    """Stops a run whose loss is not finite, or spikes for several steps, with a checkpoint and one sentence."""

    enabled: bool = True
    threshold: float = bounded(2.0, gt=0)  # a spike: a loss this far above the median of the recent losses (2 nats = 7x the perplexity)
    patience: int = bounded(3, ge=1)  # consecutive spiking logging steps before stopping (a NaN/Inf loss stops at once)
    window: int = bounded(20, ge=1)  # how many recent losses the median looks at


@dataclass
class SweepConfig:
    """What a multirun sweep optimises: run() returns summary[metric] (Optuna reads it, sweep_summary marks the best)."""

    metric: str = "eval_loss"  # a summary.json key: eval_loss | train_loss | eval_reward_accuracy | ...
    direction: str = choice("minimize", "minimize", "maximize")


@dataclass
class CompareConfig:
    """mode=compare run=<sweep dir | folder of runs | [dirA,dirB]>: a table of runs and their loss curves."""

    sort_by: str = "eval_loss"  # a metric column (train_loss, eval_loss, wall_time_s, steps) or a differing config key
    descending: bool = False
    output: Optional[str] = None  # folder for comparison.md / comparison_loss.png (null: the compared folder; a list: the folder the runs share)


@dataclass
class JudgeConfig:
    """eval=judge: an LLM judge behind any OpenAI-compatible endpoint (medgpt/evaluation/judge.py)."""

    base_url: str = unchecked("http://127.0.0.1:8000/v1", "an endpoint URL")  # e.g. medgpt's own mode=serve, vLLM, OpenAI
    model: Optional[str] = unchecked(None, "a model id the endpoint serves")  # null: the endpoint's first /v1/models entry
    api_key_env: Optional[str] = unchecked("OPENAI_API_KEY", "the NAME of an environment variable")  # never the key itself
    temperature: float = bounded(0.0, ge=0, le=2)  # 0: the same verdict on a rerun (when the endpoint is deterministic)
    max_tokens: int = bounded(200, ge=1)  # per verdict; the reply is read for JSON scores
    timeout_s: float = bounded(60.0, gt=0)  # per request
    retries: int = bounded(2, ge=0)  # per request, on connection errors and 5xx; then the evaluation stops (resumable)
    concurrency: int = bounded(4, ge=1)  # requests in flight at once (higher = faster against a remote API, more load on it)


@dataclass
class EvalConfig:
    """mode=eval (conf/eval/<suite>.yaml; medgpt/evaluation/): what is evaluated and how it is scored."""

    name: str = choice(MISSING, "mcq", "generation", "judge")  # the suite: eval/<name>/ in the run directory
    files: list[str] = MISSING  # questions: paths or globs relative to paths.root
    limit: Optional[int] = bounded(None, ge=1)  # the first N questions only (null = all)
    on_error: str = choice("fail", "fail", "skip")  # a malformed question: stop, or skip it (and count it)
    batch_size: int = bounded(8, ge=1)  # questions per forward pass / per generation batch (higher = more memory)
    max_new_tokens: int = bounded(128, ge=1)  # generated tokens per answer (generation; mcq with scoring=generate)
    scoring: str = choice("loglik", "loglik", "generate")  # mcq: log-likelihood of each option, or a generated letter
    target: str = choice("letter", "letter", "text")  # mcq loglik: score the option's letter or its text
    normalize: str = choice("none", "none", "token", "byte")  # mcq loglik: the score that decides (summed, or per token/byte)
    shots: int = bounded(0, ge=0)  # mcq: solved examples from dev_files before each question
    dev_files: list[str] = field(default_factory=list)  # mcq: where the shots come from
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # eval=judge: the judging model's endpoint
    against: Optional[str] = unchecked(None, "a run directory")  # judge: pairwise win rate against this run's answers
    baseline: bool = False  # mode=eval run=<dir>: also the run's starting model (no adapter), and a paired test of the difference
    after: list[str] = field(default_factory=list)  # training: suites a run evaluates itself with at its end, e.g. [mcq]


@dataclass
class PathsConfig:
    root: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    mode: str = choice("train", *MODES)
    run: Any = None  # a finished run directory, or latest, for modes that read one (mode=compare: also a list)
    resume: bool = False  # with run=<dir>: continue an interrupted run from its last checkpoint, in the same directory
    seed: int = bounded(42, ge=0, le=MAX_SEED)
    tag: Optional[str] = None  # appended to the run directory name
    quantize: str = choice("none", "none", "int8", "nf4", "fp4")  # inference modes load the model through bitsandbytes
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    method: Any = MISSING  # one of the *MethodConfig schemas, chosen by method=<name> (see method_schema)
    lora: LoraConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    hardware: HardwareConfig = MISSING
    template: TemplateConfig = MISSING
    logger: LoggerConfig = MISSING
    launcher: LauncherConfig = MISSING
    fsdp: FSDPConfig = MISSING
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    eval: EvalConfig = MISSING  # chosen by eval=<suite> (mcq | generation); read by mode=eval
    trainer: dict[str, Any] = field(default_factory=dict)  # any other TrainingArguments field, e.g. trainer.optim=adamw_torch_fused


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
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    for name, stage in _methods().items():  # each method declares its schema in medgpt/stages/methods/<name>.py
        cs.store(group="method", name=f"{name}_schema", node=stage.schema)


GROUP_SCHEMAS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "deepspeed": DeepSpeedConfig,
                 "hardware": HardwareConfig, "template": TemplateConfig, "logger": LoggerConfig,
                 "launcher": LauncherConfig, "fsdp": FSDPConfig, "eval": EvalConfig}

# The top-level nodes whose values check_values() checks, per mode (the top-level keys mode and seed always):
# the nodes that mode reads. Serving loads with model/template/hardware (dtype, device) besides run=<dir>;
# training never reads serve/predict, so a stray serve.port=0 does not stop a training run (and vice versa).
SERVING_NODES = ("model", "template", "hardware", "generation", "serve")
CHECKED_NODES = {
    "train": ("model", "data", "method", "lora", "deepspeed", "hardware", "template", "logger", "launcher", "fsdp",
              "watchdog", "sweep", "merge"),  # merge: method=pipeline merges the last adapter
    "serve": SERVING_NODES, "chat": SERVING_NODES, "webui": SERVING_NODES,
    "predict": (*SERVING_NODES, "predict"),
    "merge": ("merge",),
    "export": ("export",),
    "eval": ("model", "template", "hardware", "eval"),
    "compare": ("compare",),
    "preview": ("model", "data", "method", "lora", "deepspeed", "hardware", "template"),  # the training setup, no model loaded
}


def method_schema(name: str) -> type:
    """The schema of method=<name> (MethodConfig for methods without knobs of their own, e.g. pipeline)."""
    stage = _methods().get(name)
    return stage.schema if stage else MethodConfig


def _methods() -> dict:
    from medgpt.stages.protocol import methods  # import-light: no torch

    return methods()


def node_schema(cfg: DictConfig, key: str) -> type:
    """The schema behind the top-level node `key` of a composed config (method: chosen by method.name)."""
    if key == "method":
        return method_schema(cfg.method.name)
    return typing.get_type_hints(Config)[key]


def check_known_keys(cfg: DictConfig) -> None:
    """Keys forced in with `+group.key=...` bypass struct mode; refuse them here instead of ignoring them."""
    for group in [*GROUP_SCHEMAS, "method"]:
        if group not in cfg:  # a run's config.yaml saved before the group existed (resume=true reads it)
            continue
        known = {f.name for f in dataclasses.fields(node_schema(cfg, group))}
        unknown = sorted(set(cfg[group].keys()) - known)
        if unknown:
            raise ConfigError(f"unknown key {group}.{unknown[0]} (known: {', '.join(sorted(known))}).")


def check_fields(node: DictConfig, schema: type, prefix: str = "", nested: bool = True) -> None:
    """Every field of `schema` that declares limits (bounded/choice) holds an accepted value in `node`;
    works for any dataclass whose fields carry that metadata. Raises ConfigError naming `prefix + key`.
    `nested`: also the nodes of nested schemas (eval.judge.*); the top level checks its nodes per mode instead."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if nested and dataclasses.is_dataclass(hints.get(f.name)) and isinstance(node.get(f.name), DictConfig):
            check_fields(node[f.name], hints[f.name], f"{prefix}{f.name}.")
            continue
        limits = limits_of(f)
        if limits is None or f.name not in node or OmegaConf.is_missing(node, f.name):
            continue
        value = node[f.name]
        problem = limits.problem(value)
        if problem:
            raise ConfigError(f"{prefix}{f.name}={value!r} {problem}")


def check_values(cfg: DictConfig) -> None:
    """Each value within its field's limits: the top-level mode and seed always, then the nodes the mode reads
    (CHECKED_NODES): train checks the training groups, launcher, fsdp, watchdog, sweep and merge; serve, chat
    and webui check model, template, hardware, generation and serve (predict adds predict); merge checks
    merge; compare checks compare; eval checks model, template, hardware and eval."""
    check_fields(cfg, Config, nested=False)
    for key in CHECKED_NODES[cfg.mode]:
        check_fields(cfg[key], node_schema(cfg, key), f"{key}.")


def _non_default(node: DictConfig, schema: type) -> Optional[str]:
    """The first key of `node` (other than name) whose value differs from the schema's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    return next((k for k, v in defaults.items() if k != "name" and node.get(k) != v), None)


def validate(cfg: DictConfig) -> None:
    """Values within their limits (check_values), then cross-field rules; raises ConfigError with one sentence
    naming the keys involved. The cross-field rules are the training run's: other modes stop after the values."""
    check_values(cfg)
    check_known_keys(cfg)
    if cfg.mode != "train":
        return
    hw, lora, ds, launcher, fsdp = cfg.hardware, cfg.lora, cfg.deepspeed, cfg.launcher, cfg.fsdp
    if hw.name == "t4" and hw.dtype == "bf16":
        raise ConfigError("hardware=t4 has no bf16 support: use hardware.dtype=fp16 (or fp32).")
    if hw.device == "cpu" and hw.dtype == "fp16":
        raise ConfigError("hardware.dtype=fp16 needs a GPU: use fp32 or bf16 on the CPU.")
    if cfg.get("quantize", "none") != "none":
        raise ConfigError(f"quantize={cfg.quantize} is for the inference modes (serve, chat, predict, webui, eval); "
                          "to train on a quantised base use lora=qlora.")
    if lora.quantization and lora.name == "none":
        raise ConfigError("lora.quantization needs an adapter: use lora=qlora (or lora=lora with lora.quantization).")
    if lora.quantization and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora=qlora needs bitsandbytes: pip install 'bitsandbytes>=0.49'.")
    if cfg.method.get("neftune_noise_alpha") is not None and cfg.method.name == "grpo":
        raise ConfigError("method.neftune_noise_alpha would also add noise to the completions method=grpo samples (it samples "
                          "in training mode): leave it unset with method=grpo.")
    if cfg.model.get("rope_scaling") and (cfg.method.name == "rm" or cfg.method.get("reference") == "base"):
        what = "method=rm's sequence-classification model" if cfg.method.name == "rm" else "the reference (method.reference=base)"
        raise ConfigError(f"model.rope_scaling is not applied to {what}, which loads without it: leave model.rope_scaling unset here.")
    if lora.quantization and ds.zero_stage == 3:
        raise ConfigError("QLoRA (lora.quantization) cannot be combined with deepspeed=zero3: use zero2 or none.")
    # multi-process training: what can be told without probing devices (config.py imports no torch)
    if launcher.name == "local" and (key := _non_default(launcher, LauncherConfig)):
        raise ConfigError(f"launcher.{key}={launcher[key]} needs a multi-process launcher: add launcher=torchrun "
                          "(launcher=local runs this one process).")
    if launcher.node_rank >= launcher.nnodes:
        raise ConfigError(f"launcher.node_rank={launcher.node_rank} must be below launcher.nnodes={launcher.nnodes} "
                          "(node ranks count from 0).")
    if launcher.rdzv_endpoint is not None and not re.fullmatch(r"[^\s:]+:\d{1,5}", str(launcher.rdzv_endpoint)):
        raise ConfigError(f"launcher.rdzv_endpoint={launcher.rdzv_endpoint!r} is not host:port (e.g. node0:29400).")
    if launcher.backend == "nccl" and hw.device == "cpu":
        raise ConfigError("launcher.backend=nccl needs CUDA GPUs but hardware.device=cpu: use launcher.backend=gloo (or auto).")
    if fsdp.name == "none" and (key := _non_default(fsdp, FSDPConfig)):
        raise ConfigError(f"fsdp.{key} has no effect with fsdp=none: add fsdp=full_shard (or shard_grad_op).")
    if fsdp.cpu_offload and hw.device == "cpu":
        raise ConfigError("fsdp.cpu_offload=true needs GPUs (the parameters are already on the CPU): drop it with hardware=cpu.")
    if fsdp.name != "none" and ds.zero_stage > 0:
        raise ConfigError(f"fsdp={fsdp.name} and deepspeed={ds.name} both shard the model: pick one (fsdp=none or deepspeed=none).")
    if fsdp.name != "none" and lora.quantization:
        raise ConfigError(f"fsdp={fsdp.name} with QLoRA (lora.quantization={lora.quantization}) is not supported here: "
                          "use fsdp=none (deepspeed=zero2 shards QLoRA), or lora=lora.")
