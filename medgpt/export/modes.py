"""mode=export run=<dir>|latest export.format=gguf|bnb|merged: a completed run's model in a deployable form.

    gguf    one .gguf file (export.gguf_type f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0) with the tokenizer and chat
            template inside, for llama.cpp / Ollama; Llama-family (SmolLM2) and Qwen2 models (medgpt.export.gguf_file)
    bnb     a bitsandbytes 4/8-bit safetensors folder (export.bnb nf4|fp4|int8) that transformers reloads as it is
    merged  fp16/bf16 safetensors (export.dtype) with tokenizer and template, for vLLM or any transformers user

The source is the run's full model in fp32: merged/ or model/, or the base model with adapter/ merged in memory
(the run directory is not changed). Everything is written to a hidden folder inside the run, checked, then
renamed to `<run>/export/<format>/` under the run's short update lock (config.yaml and summary.json are not
touched); a second export of the same format replaces the first. Each folder holds export_report.json (files
and sizes, the reload time, the round trip of medgpt.export.verify: the export loaded back — the GGUF through
transformers' GGUF reader, the path the embedded model uses — against the source on fixed prompts) and a
model card (README.md). The bnb folder is saved straight after quantised loading, before any forward pass:
on CPU, bitsandbytes repacks 4-bit weights during a forward, and a model saved after one reloads different.
Refuses: runs that are not completed (failed, running, interrupted, crashed), reward models, architectures
the GGUF writer does not know, bitsandbytes without a backend for this device. A round trip outside its
tolerance keeps the folder (for inspection), marks the report `verified: false` and exits non-zero.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from medgpt.data.templates import SAVED_TEMPLATE, load_saved_template, stop_token_ids
from medgpt.errors import ConfigError, ModelError
from medgpt.export.card import model_card
from medgpt.export.verify import compare, probe, tokenizer_parity
from medgpt.registry import register
from medgpt.tracking.rundir import RunDir, resolve_run, trained_run, write_json

log = logging.getLogger(__name__)
EXPORT_DIR = "export"
REPORT = "export_report.json"
_NOT_EXPORTABLE = {
    "failed": "failed: there is no finished model to export; fix what its summary.json reports and train again",
    "running": "is still running: export it once it has completed",
    "interrupted": "was interrupted: continue it (run={path} resume=true), then export it",
    "crashed": "crashed (its process is gone): continue it (run={path} resume=true), then export it",
}


def export_dir(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / EXPORT_DIR / fmt


def require_exportable(run: RunDir) -> None:
    status = run.status()
    if status != "completed":
        why = _NOT_EXPORTABLE.get(status, f"has status {status}: mode=export reads a completed training run")
        raise ConfigError(f"run {run.path} {why.format(path=run.path)}.")
    if run.read_summary().get("stage") == "rm":
        raise ConfigError(f"run {run.path} is a reward model (method=rm): export a generative run.")


def load_source(run: RunDir, trust_remote_code: bool = False):
    """(fp32 model, tokenizer, template, source description) for the run's weights; an adapter is merged in memory."""
    from medgpt.modeling.loader import Placement, load_model, load_tokenizer

    found = run.weights()
    if found is None:
        raise ModelError(f"run {run.path} has no merged/, model/ or adapter/ to export; did its training finish?")
    kind, folder = found
    base = run.base_model_path() if kind == "adapter" else str(folder)
    tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else base, trust_remote_code)
    try:
        # an adapter's base reshaped as training reshaped it (added tokens, RoPE scaling: adapter/medgpt_base.json)
        model = load_model(base, Placement("cpu", torch.float32, "sdpa"), trust_remote_code=trust_remote_code,
                           adapter=str(folder) if kind == "adapter" else None)
        if kind == "adapter":
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load run {run.path}'s model ({base}): {e}") from None
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, load_saved_template(folder))
    return model.eval(), tokenizer, load_saved_template(folder), {"weights": kind, "folder": str(folder), "base_model": base}


def _save_beside(tokenizer, folder: Path, source_folder: str) -> None:
    """The tokenizer (with its chat template) and medgpt's template file, so serving reads the export as it reads a run."""
    tokenizer.save_pretrained(folder)
    saved = Path(source_folder) / SAVED_TEMPLATE
    if saved.exists():
        shutil.copy(saved, folder / SAVED_TEMPLATE)


def _gguf(e: DictConfig, run: RunDir, model, tokenizer, source: dict, tmp: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.export.gguf_file import write_gguf

    name = f"{run.path.name}-{e.gguf_type}.gguf"
    written = write_gguf(model, tokenizer, tmp / name, e.gguf_type, run.path.name)
    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    back = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    if back.pad_token is None:
        back.pad_token = back.eos_token
    extra = {"gguf": {**written, "k_quants": "not written: the gguf package cannot quantise to K-quants (q4_k_m, ...); "
                                             "convert this file with llama.cpp's llama-quantize for those"}}
    return e.gguf_type, reloaded, back, load_s, extra


def _bnb(e: DictConfig, run: RunDir, model, tokenizer, source: dict, tmp: Path):
    from transformers import AutoModelForCausalLM

    from medgpt.modeling.loader import quantization_config, require_bitsandbytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    require_bitsandbytes(e.bnb, device, "export.bnb")
    full = source["folder"] if source["weights"] != "adapter" else None
    if full is None:  # bitsandbytes quantises while loading: the merged fp32 model goes through a scratch folder
        full = tmp / ".source"
        model.save_pretrained(full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "inputs will be cast to float16" (int8 on CPU)
        fresh = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32, quantization_config=quantization_config(e.bnb, torch.float32),
                                                     device_map={"": device})
        fresh.generation_config.eos_token_id = model.generation_config.eos_token_id
        fresh.save_pretrained(tmp)  # freshly loaded, no forward pass yet (see the module docstring)
        del fresh
        shutil.rmtree(tmp / ".source", ignore_errors=True)
        _save_beside(tokenizer, tmp, source["folder"])
        started = time.perf_counter()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, device_map={"": device}).eval()
        load_s = time.perf_counter() - started
    return e.bnb, reloaded, tokenizer, load_s, {"bnb": {"device": device, "quantization_config": reloaded.config.quantization_config.to_dict()
                                                         if hasattr(reloaded.config.quantization_config, "to_dict")
                                                         else reloaded.config.quantization_config}}


def _merged(e: DictConfig, run: RunDir, model, tokenizer, source: dict, tmp: Path):
    from transformers import AutoModelForCausalLM

    name = e.dtype if e.dtype != "auto" else ("bf16" if run.read_summary().get("dtype") == "bf16" else "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
    model.to(dtype).save_pretrained(tmp)
    model.to(torch.float32)
    _save_beside(tokenizer, tmp, source["folder"])
    started = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()  # the saved (rounded) weights, computed in fp32
    load_s = time.perf_counter() - started
    return name, reloaded, tokenizer, load_s, {}


WRITERS = {"gguf": _gguf, "bnb": _bnb, "merged": _merged}


def export_run(run_dir: Path, e: DictConfig, trust_remote_code: bool = False) -> dict:
    """Write `<run>/export/<e.format>/` and return its export_report.json content."""
    run = RunDir(run_dir)
    require_exportable(run)
    if e.format == "gguf":
        from transformers import AutoConfig

        from medgpt.export.gguf_file import check_architecture, tokenizer_pre

        found = run.weights()
        config_dir = found[1] if found and found[0] != "adapter" else run.base_model_path()
        check_architecture(AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code))  # before the slow part
    model, tokenizer, template, source = load_source(run, trust_remote_code)
    if e.format == "gguf":
        tokenizer_pre(json.loads((Path(tokenizer.name_or_path) / "tokenizer.json").read_text()))
    reference = probe(model, tokenizer, template, e.prompts, e.max_new_tokens)
    tmp = Path(tempfile.mkdtemp(dir=run.path, prefix=f".export-{e.format}-"))
    try:
        detail, reloaded, back, load_s, extra = WRITERS[e.format](e, run, model, tokenizer, source, tmp)
        verification = compare(reference, probe(reloaded, back, template, e.prompts, e.max_new_tokens), detail, e.tolerance)
        tokens = tokenizer_parity(tokenizer, back, template) if e.format == "gguf" else None
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        weights = sum(size for name, size in files.items() if name.endswith((".gguf", ".safetensors")))
        report = {"format": e.format, "type": detail, "run": str(run.path), "source": source,
                  "size_bytes": weights, "size_mb": round(weights / 2**20, 3), "files": files,
                  "load_time_s": round(load_s, 3), "verification": verification, **({"tokenizer": tokens} if tokens else {}),
                  **extra}
        report["verified"] = bool(verification["passed"] and (tokens is None or (tokens["encode_equal"] and tokens["chat_template_equal"])))
        (tmp / "README.md").write_text(model_card(run.path, e.format, detail, report))
        write_json(tmp / REPORT, report)
        out = export_dir(run.path, e.format)
        with run.update_lock():  # the folder appears whole, and never while another mode adds to the run
            out.parent.mkdir(exist_ok=True)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not report["verified"]:
        v = verification
        raise ModelError(f"the {e.format} export ({detail}) in {out} failed its round trip: relative logit difference "
                         f"{v['relative_logit_diff']:.3g} (tolerance {v['tolerance_relative']:.3g}), greedy answers equal: "
                         f"{v['greedy_equal']}{'' if tokens is None else ', tokenizer encodes alike: ' + str(tokens['encode_equal'])}"
                         f"; see {REPORT} there.")
    return report


@register("export")
def export_mode(cfg: DictConfig, log_dir: Path) -> dict:
    run_dir = trained_run(resolve_run(cfg.run, Path(cfg.paths.output_dir)).resolve())  # a pipeline root: its last stage
    print(f"exporting run {run_dir} as {cfg.export.format}", flush=True)
    report = export_run(run_dir, cfg.export, bool(cfg.model.trust_remote_code))
    v = report["verification"]
    print(f"exported: {export_dir(run_dir, cfg.export.format)}  ({report['type']}, {report['size_mb']:.1f} MB, "
          f"reload {report['load_time_s']:.2f} s)\n"
          f"  round trip: relative logit difference {v['relative_logit_diff']:.2e} (tolerance {v['tolerance_relative']:.0e}), "
          f"greedy answers equal: {v['greedy_equal']}, prompt loss {v['prompt_loss_source']:.4f} -> {v['prompt_loss_export']:.4f}",
          flush=True)
    return report
