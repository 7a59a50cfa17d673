"""The model card (README.md) every exported folder carries: base model, methods, data provenance, eval results,
intended use and the "not medical advice" notice — all read from the run directory (config.yaml, summary.json,
eval/<suite>/results.json), nothing invented. Writes nothing itself: `model_card(...)` returns the text.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from medgpt.tracking.rundir import RunDir, read_json


def _eval_lines(run: RunDir) -> list[str]:
    lines = []
    for results in sorted((run.path / "eval").glob("*/results.json")):
        data = read_json(results)
        metrics = data.get("metrics") or {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:8]
                          if isinstance(v, int | float))
        lines.append(f"- `{results.parent.name}`: {shown or 'see results.json'}")
    return lines


def model_card(run_dir: Path, export_format: str, detail: str, report: dict, command: str | None = None,
               report_name: str = "export_report.json") -> str:
    """README.md text for `<run>/export/<format>/` (and `<run>/merged/`: export_format "merged", the mode=merge command)."""
    run = RunDir(run_dir)
    summary = run.read_summary()
    cfg = OmegaConf.load(run.config) if run.config.exists() else OmegaConf.create({})
    pick = lambda key: OmegaConf.select(cfg, key, default=None)  # noqa: E731
    base = summary.get("root_model_path") or summary.get("base_model_path") or pick("model.name_or_path")
    files = pick("data.train_files") or []
    method = summary.get("stage") or pick("method.name")
    lora = summary.get("adapter") or pick("lora.name")
    evals = _eval_lines(run)
    verified = report.get("verified")
    lines = [
        f"# {run.path.name} ({export_format}: {detail})",
        "",
        f"Exported by medgpt (`{command or 'python launch.py mode=export run=<run> export.format=' + export_format}`).",
        "",
        "## Model",
        f"- Base model: `{pick('model.name_or_path') or '?'}` (weights from `{base}`)",
        f"- Method: {method or '?'}" + (f" with {lora}" if lora and lora != "none" else "") +
        (f"; trained {summary.get('steps')} steps" if summary.get("steps") is not None else ""),
        f"- Chat template: {summary.get('template') or pick('template.name') or 'the tokenizer’s own'} (saved with the tokenizer)",
        f"- Export: {export_format} {detail}; round trip verified: {verified} ({report_name})",
        "",
        "## Data provenance",
        f"- Dataset config: `{pick('data.name') or '?'}`; training files: {', '.join(f'`{f}`' for f in files) or '?'}",
        "- See the run directory's config.yaml for every setting, and the data files' own licences and sources.",
        "",
        "## Evaluation",
        *(evals or ["- No `mode=eval` results in the run directory when this was exported."]),
        (f"- Held-out loss after training: {summary.get('eval_loss'):.4f}" if isinstance(summary.get("eval_loss"), float) else
         "- No held-out loss recorded."),
        "",
        "## Intended use",
        "Research, teaching and experiments with small medical language models: trying a training method, comparing runs,",
        "running a model locally. Not evaluated for clinical use.",
        "",
        "**Not medical advice.** This model's answers may be wrong, outdated or harmful. Do not use them to diagnose,",
        "treat or make any decision about a person's health; ask a qualified clinician.",
        "",
    ]
    return "\n".join(lines)
