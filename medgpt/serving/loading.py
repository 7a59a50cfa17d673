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
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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

    run_dir = resolve_run(cfg.run, Path(cfg.paths.output_dir)).resolve()
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


def load(cfg: DictConfig, max_batch_size: int | None = None) -> Loaded:
    """Resolve the artefacts, then start the engine `serve.engine` names."""
    from medgpt.modeling.loader import load_tokenizer

    if cfg.serve.engine not in ("hf", "vllm"):
        raise ConfigError(f"serve.engine={cfg.serve.engine!r} is not one of hf, vllm.")
    if cfg.serve.engine == "vllm":
        from medgpt.serving.vllm_engine import require_vllm

        require_vllm()  # fail in one sentence before loading anything
    artefacts = resolve_artefacts(cfg)
    tokenizer = load_tokenizer(artefacts.tokenizer_path, artefacts.trust_remote_code)
    stop_ids = artefacts.stop_ids or stop_token_ids(tokenizer, artefacts.template)
    stop_string = artefacts.template.stop_string(tokenizer.bos_token, tokenizer.eos_token)
    batch = max_batch_size or cfg.serve.max_batch_size
    if artefacts.reward_model:  # sequence classification + its adapter, behind a scorer (medgpt.serving.rewards)
        from medgpt.serving.rewards import load_reward_engine

        engine, context = load_reward_engine(cfg, artefacts, tokenizer, batch)
        return Loaded(artefacts, engine, tokenizer, artefacts.template, stop_ids, context)
    if cfg.serve.engine == "vllm":
        from medgpt.serving.vllm_engine import VLLMEngine

        engine = VLLMEngine(artefacts, stop_ids, (stop_string,), cfg)
        context = engine.context_length
    else:
        model = _load_hf_model(cfg, artefacts)
        context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
        from medgpt.serving.hf_engine import HFEngine

        engine = HFEngine(model, tokenizer, stop_ids, (stop_string,), batch, cfg.serve.batch_wait_ms, context)
    return Loaded(artefacts, engine, tokenizer, artefacts.template, stop_ids, context)


def _load_hf_model(cfg: DictConfig, a: Artefacts):
    from medgpt.modeling.loader import load_model, resolve_placement

    placement = resolve_placement(cfg.hardware)
    model = load_model(a.model_path, placement, trust_remote_code=a.trust_remote_code, adapter=a.adapter_path)  # shaped as trained
    if a.adapter_path:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # peft calls a deprecated transformers property while merging
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, a.adapter_path).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"could not apply the adapter {a.adapter_path} to {a.model_path}: {e}") from None
    return model.eval()
