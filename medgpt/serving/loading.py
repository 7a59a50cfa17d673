"""From `run=<dir>|latest` (or an untrained `model=<name>`) to what an engine needs.

A finished run directory holds one artefact (a pipeline's root directory points at its last stage,
`final_run` in its summary.json); serving prefers, in order:
  merged/   a merged full model (tokenizer and medgpt_template.yaml beside it)
  model/    full fine-tuning weights (same)
  adapter/  a PEFT adapter, applied to the base model recorded in summary.json (`base_model_path`)
The chat template is the one training saved (medgpt_template.yaml); `template=<name>` on the command
line overrides it. Without `run`, the untrained `model=<name>` is served with its configured template.
The hf engine merges an adapter into the base weights in memory (exact, and faster per token);
vLLM applies it as a LoRA request.

`quantize=int8|nf4|fp4` loads the weights through bitsandbytes (CPU or CUDA backend): a merged/ or
model/ folder is quantised as a whole; an adapter is applied on top of the quantised base, unmerged
(merging into 4/8-bit weights would round it; an adapter that cannot sit on a quantised base is refused
with "merge it first"). `mode=serve run=[dirA,dirB,...]` serves several runs' adapters on one base model
(PEFT multi-adapter, unmerged): they must share the base model, the template and the tokenizer; the
request's `model` field picks the adapter (the first run answers requests that name none).
The engine is the one `serve.engine` names in the engine registry (medgpt.serving.engine.ENGINES).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from medgpt.data.templates import Template, load_saved_template, resolve_template, stop_token_ids
from medgpt.errors import ConfigError, ModelError
from medgpt.tracking.rundir import RunDir, resolve_run, trained_run

log = logging.getLogger(__name__)


@dataclass
class Artefacts:
    name: str  # the model id shown by the API
    run_dir: Path | None
    weights: str  # merged | model | adapter | untrained
    model_path: str  # the folder holding full weights (the base model when weights == adapter)
    adapter_path: str | None
    tokenizer_path: str
    template: Template
    template_source: str
    trust_remote_code: bool = False
    stop_ids: list[int] | None = None  # saved by training (summary.json); None: derive them from the template
    reward_model: bool = False  # a method=rm run (summary.json stage "rm"): it scores texts (POST /v1/rewards), never generates
    adapters: dict[str, str] = field(default_factory=dict)  # several runs served on one base: model id -> adapter folder


@dataclass
class Loaded:
    """What the inference modes share: the engine plus the tokenizer and template that build prompts."""

    artefacts: Artefacts
    engine: object  # medgpt.serving.engine.Engine
    tokenizer: object
    template: Template
    stop_ids: list[int]
    context_length: int

    def render(self, messages: list[dict]) -> str:
        """`messages` rendered with the run's template, ending with the assistant's generation prompt."""
        tok = self.tokenizer
        return self.template.render(messages, tok.bos_token or "", tok.eos_token or "", add_generation_prompt=True)

    def model_ids(self) -> list[str]:
        """The ids requests may name in `model` (several with mode=serve run=[dirA,dirB])."""
        return list(self.artefacts.adapters) or [self.artefacts.name]

    def adapter_for(self, model: str | None) -> str | None:
        """The engine's adapter name for a request's `model` (None: the default); KeyError for an id not served here."""
        if model in (None, ""):
            return None
        if model not in self.model_ids():
            raise KeyError(model)
        return model if self.artefacts.adapters else None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.text_ids(self.render(messages))

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def describe(self, mode: str) -> str:
        a = self.artefacts
        lines = [f"medgpt {mode}: loaded",
                 f"  run directory  {a.run_dir or 'none (untrained model)'}",
                 f"  base model     {a.model_path}",
                 f"  adapter        {a.adapter_path or 'none'}",
                 *(f"  served         {name}: {path}" for name, path in a.adapters.items()),
                 f"  weights        {a.weights}",
                 f"  template       {a.template.name} ({a.template_source})",
                 f"  engine         {getattr(self.engine, 'name', '?')}; context {self.context_length} tokens"]
        return "\n".join(lines)


def resolve_artefacts(cfg: DictConfig) -> Artefacts:
    """Find weights, tokenizer and template for `cfg` without loading any weights."""
    from medgpt.modeling.loader import load_tokenizer, resolve_model_path

    override = cfg.template.name != "auto"
    if not cfg.run:
        path = resolve_model_path(cfg.model.name_or_path, cfg.paths.cache_dir, cfg.model.revision)
        tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
        template = resolve_template(cfg.template, cfg.model.template, tokenizer)
        return Artefacts(cfg.serve.model_name or cfg.model.name, None, "untrained", path, None, path, template,
                         f"template={template.name}" if override else "model.template / the tokenizer's own",
                         cfg.model.trust_remote_code)

    if isinstance(cfg.run, ListConfig | list) and len(cfg.run) > 1 and cfg.mode == "serve":
        return _resolve_adapters(cfg, [str(r) for r in cfg.run])
    if isinstance(cfg.run, ListConfig | list) and len(cfg.run) > 1:
        raise ConfigError(f"run=[...] names several runs; mode={cfg.mode} reads one (mode=serve serves several runs' adapters on "
                          "one base model, mode=compare compares runs).")
    run = cfg.run[0] if isinstance(cfg.run, ListConfig | list) and len(cfg.run) == 1 else cfg.run
    run_dir = resolve_run(run, Path(cfg.paths.output_dir)).resolve()
    run_dir = trained_run(run_dir).resolve()  # a pipeline's root directory: serve its last stage
    run = RunDir(run_dir)
    summary = run.read_summary()
    run_cfg = OmegaConf.load(run.config)
    trust = bool(cfg.model.trust_remote_code)  # this command's setting, never the run's saved one (it could come from anyone)
    if OmegaConf.select(run_cfg, "model.trust_remote_code", default=False) and not trust:
        log.warning("run %s trained with model.trust_remote_code=true; pass model.trust_remote_code=true to serve it with remote code", run_dir)
    if summary.get("status") not in (None, "completed"):
        log.warning("run %s has status %r; serving what it saved", run_dir, summary.get("status"))
    adapter_path = None
    found = run.weights()
    if found is None:
        raise ModelError(f"run {run_dir} has no merged/, model/ or adapter/ to serve; did its training finish?")
    weights, folder = found
    model_path = str(folder)
    if weights == "adapter":
        adapter_path = str(folder)
        model_path = run.base_model_path()
        if not model_path or not Path(model_path).exists():
            name = OmegaConf.select(run_cfg, "model.name_or_path")
            if not name:
                raise ModelError(f"run {run_dir}: cannot tell the base model of its adapter (no base_model_path in summary.json).")
            model_path = resolve_model_path(name, cfg.paths.cache_dir, OmegaConf.select(run_cfg, "model.revision"))
    tokenizer_path = str(folder) if (folder / "tokenizer_config.json").exists() else model_path
    saved = load_saved_template(folder)
    if override or saved is None:
        source_cfg = cfg if override else run_cfg
        tokenizer = load_tokenizer(tokenizer_path, trust)
        template = resolve_template(source_cfg.template, OmegaConf.select(source_cfg, "model.template", default="auto"), tokenizer)
        source = f"template={template.name}" if override else "the run's config.yaml"
    else:
        template, source = saved, f"{folder.name}/medgpt_template.yaml"
    return Artefacts(cfg.serve.model_name or run_dir.name, run_dir, weights, model_path, adapter_path, tokenizer_path, template,
                     source, trust, None if override else summary.stop_token_ids, reward_model=summary.get("stage") == "rm")


def _resolve_adapters(cfg: DictConfig, runs: list[str]) -> Artefacts:
    """mode=serve run=[dirA,dirB,...]: each run's adapter/ on their one shared base model."""
    if cfg.template.name != "auto":
        raise ConfigError("template= cannot be combined with run=[...]: the runs are served with the template they trained with.")
    parts = []
    for given in runs:
        run_dir = trained_run(resolve_run(given, Path(cfg.paths.output_dir)).resolve()).resolve()
        run = RunDir(run_dir)
        adapter = run.artefact("adapter")
        if not (adapter / "adapter_config.json").exists():
            raise ConfigError(f"run {run_dir} has no adapter/ (it holds full weights): run=[...] serves adapters on one shared "
                              "base model; serve that run on its own.")
        if run.read_summary().get("stage") == "rm":
            raise ConfigError(f"run {run_dir} is a reward model (method=rm): serve it on its own.")
        template = load_saved_template(adapter)
        parts.append((run_dir, run.base_model_path(), adapter, template, run.read_summary().stop_token_ids))
    first = parts[0]
    from medgpt.modeling.vocab import read_base_changes

    for run_dir, base, adapter, template, _stops in parts[1:]:
        if base != first[1]:
            raise ConfigError(f"runs {first[0]} and {run_dir} adapt different base models ({first[1]} and {base}): "
                              "run=[...] serves adapters of one base model; serve them separately.")
        if template != first[3]:
            raise ConfigError(f"runs {first[0]} and {run_dir} trained with different chat templates: serve them separately.")
        if read_base_changes(str(first[2])) != read_base_changes(str(adapter)):
            raise ConfigError(f"runs {first[0]} and {run_dir} reshaped the base model differently (added tokens or RoPE scaling in "
                              "adapter/medgpt_base.json): serve them separately.")
    names: dict[str, str] = {}
    for run_dir, _, adapter, _, _ in parts:
        if str(adapter) in names.values():
            raise ConfigError(f"run {run_dir} is listed twice in run=[...].")
        name = run_dir.name if run_dir.name not in names else f"{run_dir.parent.name}/{run_dir.name}"
        names[name] = str(adapter)
    if not first[1] or not Path(first[1]).exists():
        raise ModelError(f"run {first[0]}: its base model {first[1]} is not there any more.")
    template = first[3]
    if template is None:
        from medgpt.modeling.loader import load_tokenizer

        template = resolve_template(cfg.template, "auto", load_tokenizer(str(first[2]), cfg.model.trust_remote_code))
    return Artefacts(next(iter(names)), first[0], "adapters", first[1], str(first[2]), str(first[2]), template,
                     "adapter/medgpt_template.yaml", bool(cfg.model.trust_remote_code), first[4], adapters=names)


def load(cfg: DictConfig, max_batch_size: int | None = None) -> Loaded:
    """Resolve the artefacts, then start the engine `serve.engine` names (medgpt.serving.engine's registry)."""
    from medgpt.modeling.loader import load_tokenizer
    from medgpt.serving.engine import engine_spec, resolve_callable

    spec = engine_spec(cfg.serve.engine)
    if spec.check is not None:
        resolve_callable(spec.check)(cfg)  # fail in one sentence before loading anything
    quantize = quantize_kind(cfg)
    if quantize:
        from medgpt.modeling.loader import require_bitsandbytes, resolve_placement

        require_bitsandbytes(quantize, resolve_placement(cfg.hardware).device)
    artefacts = resolve_artefacts(cfg)
    tokenizer = load_tokenizer(artefacts.tokenizer_path, artefacts.trust_remote_code)
    stop_ids = artefacts.stop_ids or stop_token_ids(tokenizer, artefacts.template)
    stop_string = artefacts.template.stop_string(tokenizer.bos_token, tokenizer.eos_token)
    batch = max_batch_size or cfg.serve.max_batch_size
    if artefacts.reward_model:  # sequence classification + its adapter, behind a scorer (medgpt.serving.rewards)
        if quantize:
            raise ConfigError(f"quantize={quantize} is for generative runs; {artefacts.run_dir} is a reward model: use quantize=none.")
        from medgpt.serving.rewards import load_reward_engine

        engine, context = load_reward_engine(cfg, artefacts, tokenizer, batch)
        return Loaded(artefacts, engine, tokenizer, artefacts.template, stop_ids, context)
    engine = resolve_callable(spec.build)(cfg, artefacts, tokenizer, stop_ids, (stop_string,), batch)
    return Loaded(artefacts, engine, tokenizer, artefacts.template, stop_ids, int(engine.context_length))


def quantize_kind(cfg: DictConfig) -> str | None:
    """`quantize` (int8 | nf4 | fp4), or None for none (and for configs saved before the key existed)."""
    kind = OmegaConf.select(cfg, "quantize", default="none")
    return None if kind in (None, "none") else str(kind)


def load_hf_model(cfg: DictConfig, a: Artefacts):
    """The transformers model for `a`: full weights, or the base with the adapter merged in (quantised: on top,
    unmerged), or the base with several runs' adapters (run=[...]); quantised by bitsandbytes when `quantize` says so."""
    from medgpt.modeling.loader import load_model, resolve_placement

    placement = resolve_placement(cfg.hardware)
    quantize = quantize_kind(cfg)
    model = load_model(a.model_path, placement, quantize, trust_remote_code=a.trust_remote_code, adapter=a.adapter_path)  # shaped as trained
    if a.adapters:
        return _with_adapters(model, a, quantize).eval()
    if a.adapter_path:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # peft calls a deprecated transformers property while merging
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, a.adapter_path)
                model = model if quantize else model.merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, NotImplementedError) as e:
            if quantize:
                raise ModelError(f"the adapter {a.adapter_path} cannot be applied to the {quantize}-quantised base {a.model_path} "
                                 f"({type(e).__name__}: {e}); merge it first (mode=merge run={a.run_dir}) and serve the merged "
                                 f"model with quantize={quantize}.") from None
            raise ModelError(f"could not apply the adapter {a.adapter_path} to {a.model_path}: {e}") from None
    return model.eval()


def _with_adapters(model, a: Artefacts, quantize: str | None):
    """One PeftModel holding every served run's adapter under its model id (unmerged: the request picks one)."""
    from peft import PeftModel

    names = list(a.adapters.items())
    try:
        model = PeftModel.from_pretrained(model, names[0][1], adapter_name=names[0][0])
        for name, path in names[1:]:
            model.load_adapter(path, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, NotImplementedError) as e:
        hint = f"; merge that run first and serve it on its own with quantize={quantize}" if quantize else ""
        raise ModelError(f"could not load the adapters of run=[...] onto {a.model_path} ({type(e).__name__}: {e}){hint}.") from None
    return model
