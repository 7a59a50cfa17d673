"""Merge a run's LoRA adapter into its base model (mode=merge run=<dir>|latest), with a parity check.

Writes `<run>/merged/`: safetensors weights in `merge.dtype`, config (with the run's resized vocabulary and RoPE
scaling, medgpt.modeling.vocab / rope), generation config (stop tokens),
the tokenizer with the chat template training used, a model card (README.md: base model, method, data, eval
results, intended use, not medical advice), and `merge_report.json` — greedy answers of the
adapter model and of the merged model (reloaded from disk) on fixed prompts, whether they are equal,
and the largest logit difference. The folder is written next to it and renamed into place, so a
crash never leaves a half-merged model. Refuses runs without an adapter (a full fine-tune's model/
is already a merged model).

`ensure_full_model(run)` is what `model.init_from` and the pipeline use: the run's merged/ (made on
first use) or model/ folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgpt.data.templates import SAVED_TEMPLATE, Template, load_saved_template, stop_token_ids
from medgpt.errors import ConfigError
from medgpt.export.card import model_card
from medgpt.modeling.generate import generate_answers
from medgpt.modeling.loader import DTYPES, Placement, load_model
from medgpt.registry import register
from medgpt.tracking.rundir import RunDir, resolve_run, trained_run, write_json

log = logging.getLogger(__name__)

PARITY_PROMPTS = [
    "What are the warning signs of a stroke?",
    "How much water should an adult drink in a day?",
    "Is a fever of 38.5 C in a two-year-old dangerous?",
    "What does a high LDL cholesterol result mean?",
]


def _parity(model, tokenizer, template: Template | None, n_prompts: int) -> tuple[list[str], torch.Tensor]:
    prompts = [[{"role": "user", "content": p}] for p in PARITY_PROMPTS[:n_prompts]]
    answers = generate_answers(model, tokenizer, template, prompts, 24, stop_token_ids(tokenizer, template)) if template else []
    text = (template.render(prompts[0], tokenizer.bos_token or "", tokenizer.eos_token or "", True) if template else PARITY_PROMPTS[0])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    return answers, logits


def merge_run(run_dir: Path, dtype: str = "auto", parity_prompts: int = 3) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = RunDir(run_dir)
    adapter = run.artefact("adapter")
    if not adapter.is_dir():
        what = "model/ already holds the full fine-tuned model" if run.artefact("model").is_dir() else "it has no adapter/"
        raise ConfigError(f"nothing to merge in {run_dir}: {what}.")
    base = run.base_model_path()
    summary = run.read_summary()
    name = summary.get("dtype", "fp32") if dtype == "auto" else dtype  # auto: the dtype the run trained in
    if name not in DTYPES:
        raise ConfigError(f"merge.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    torch_dtype = DTYPES[name]
    log.info("merging %s into %s (%s)", adapter, base, str(torch_dtype).removeprefix("torch."))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    template = load_saved_template(adapter)
    # the base reshaped as training reshaped it (added tokens' rows, RoPE scaling: adapter/medgpt_base.json)
    base_model = load_model(base, Placement("cpu", torch.float32, "sdpa"), adapter=str(adapter))
    model = PeftModel.from_pretrained(base_model, adapter).eval()
    answers_adapter, logits_adapter = _parity(model, tokenizer, template, parity_prompts)
    merged = model.merge_and_unload().to(torch_dtype)
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer, template)

    out = run.artefact("merged")
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".merged-"))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for extra in (SAVED_TEMPLATE,):
            if (adapter / extra).exists():
                shutil.copy(adapter / extra, tmp / extra)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        answers_merged, logits_merged = _parity(reloaded, tokenizer, template, parity_prompts)
        report = {
            "base_model_path": base, "adapter": str(adapter), "dtype": str(torch_dtype).removeprefix("torch."),
            "prompts": PARITY_PROMPTS[:parity_prompts], "greedy_adapter": answers_adapter, "greedy_merged": answers_merged,
            "greedy_equal": answers_adapter == answers_merged,
            "max_logit_diff": float((logits_adapter - logits_merged).abs().max()),
        }
        write_json(tmp / "merge_report.json", report)
        card = model_card(run_dir, "merged", f"{report['dtype']} safetensors", {"verified": report["greedy_equal"]},
                          "python launch.py mode=merge run=<run>", "merge_report.json: greedy answers equal before and after merging")
        (tmp / "README.md").write_text(card)
        with run.update_lock():  # merged/ appears whole, and never while another mode adds to the run
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model: %s (greedy equal: %s, max logit difference %.2e)", out, report["greedy_equal"], report["max_logit_diff"])
    return out


def ensure_full_model(run_dir: Path) -> Path:
    """A folder with the run's full weights: merged/ (merging the adapter on first use) or model/."""
    weights = RunDir(run_dir).weights()
    if weights and weights[0] != "adapter":
        return weights[1]
    return merge_run(run_dir)


@register("merge")
def merge_mode(cfg: DictConfig, log_dir: Path) -> dict:
    run_dir = trained_run(resolve_run(cfg.run, Path(cfg.paths.output_dir)))  # a pipeline root: its last stage
    print(f"merging run {run_dir}")
    out = merge_run(run_dir, cfg.merge.dtype, cfg.merge.parity_prompts)
    report = json.loads((out / "merge_report.json").read_text())
    print(f"merged model: {out}\n  greedy outputs equal: {report['greedy_equal']}   max logit difference: {report['max_logit_diff']:.2e}")
    return report
