"""mode=preview: the data a training run would see, from the tokenizer alone — no model is loaded.

    python launch.py mode=preview method=sft data=<name> [template=<name>] [model=<name>]

Builds each split exactly as the method does (its `Stage.build_data`, after the same tokenizer/template setup
and data-format check as the training lifecycle: medgpt.stages.lifecycle), then prints, with rich:
  - per split: examples, tokens, trained tokens (labels that are not -100), truncated and dropped counts
    (whatever the method's data builder counts), and the records skipped by data.on_error=skip;
  - the first `PREVIEW_EXAMPLES` training examples decoded, trained tokens highlighted (bold green; the
    prompt dim). Preference data shows chosen and rejected, KTO prompt + completion, GRPO the prompt (nothing
    of it is trained: the completions are generated);
and writes `<run dir>/preview/length_hist.png` (token lengths per split against method.max_length) and
`<run dir>/preview/summary.json` (the same figures). The run dir is Hydra's (hydra.run.dir, or the default).
Refuses: method=pipeline (preview its stages one by one), data the method cannot train on (one sentence).
The model folder is found as training finds it (medgpt.stages.training.prepare): an embedded model not yet in the
cache is converted once, a hub model is fetched into the local cache, a `model.init_from` run is merged on first
use; then only the tokenizer is loaded, never the weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from medgpt.data.tokenize import IGNORE
from medgpt.errors import ConfigError
from medgpt.registry import register

log = logging.getLogger(__name__)
PREVIEW_EXAMPLES = 3
TRAINED_STYLE, PROMPT_STYLE = "bold green", "dim"


@register("preview")
def preview(cfg: DictConfig, run_dir: Path) -> dict:
    from rich.console import Console

    from medgpt.stages.lifecycle import Context, check_data_format
    from medgpt.stages.protocol import methods
    from medgpt.stages.training import prepare

    stage = methods().get(cfg.method.name)
    if stage is None:
        raise ConfigError(f"mode=preview shows one training method's data; method={cfg.method.name} is not one "
                          f"(use method=<{'|'.join(methods())}>; a pipeline: preview its stages one by one).")
    setup = prepare(cfg)  # tokenizer and template, as training does; no weights
    check_data_format(cfg, stage)
    ctx = Context(cfg, None, stage, setup=setup)
    data = stage.build_data(ctx)
    tokenizer = setup.tokenizer
    splits = {"train": data.train, "eval": data.eval}
    summary: dict = {"method": stage.name, "template": setup.template.name, "format": data.stats.get("format"),
                     "skipped_records": data.stats.get("skipped", 0), "max_length": cfg.method.max_length, "splits": {}}
    lengths: dict[str, list[int]] = {}
    for name, ds in splits.items():
        held = [r for r in data.eval_records if isinstance(r, dict)] if name == "eval" else []  # GRPO: held-out prompt rows
        rows = list(ds) if ds is not None else held
        if not rows:
            continue
        seqs = [s for row in rows for s in sequences(row, tokenizer)]
        lengths[name] = [len(ids) for _, ids, _ in seqs]
        ours = {"rows": len(rows), "sequences": len(seqs), "tokens_total": sum(lengths[name]),
                "trained_tokens_total": sum(sum(1 for t in labels if t != IGNORE) for _, _, labels in seqs), "longest": max(lengths[name])}
        stats = {k: v for k, v in (data.stats.get(name) or {}).items()  # the builder's counts, less those equal to our totals
                 if isinstance(v, int | float) and not (k in ("tokens", "trained_tokens") and v == ours[f"{k}_total"])}
        summary["splits"][name] = {**stats, **ours}
    out = Path(run_dir) / "preview"
    out.mkdir(parents=True, exist_ok=True)
    summary["length_hist"] = str(length_histogram(lengths, cfg.method.max_length, out / "length_hist.png", stage.name))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console = Console(highlight=False, soft_wrap=True)
    show(console, summary, list(data.train)[:PREVIEW_EXAMPLES], tokenizer)
    console.print(f"\nlength histogram: {summary['length_hist']}\nsummary: {out / 'summary.json'}")
    return summary


def sequences(row: dict, tokenizer) -> list[tuple[str, list[int], list[int]]]:
    """(label, ids, labels) of each token sequence in a row of any method's dataset; labels all -100 when nothing is trained."""
    if "completion_ids" in row:  # KTO: prompt + completion (labels on the completion)
        return [("prompt + completion", list(row["prompt_ids"]) + list(row["completion_ids"]),
                 [IGNORE] * len(row["prompt_ids"]) + list(row["completion_labels"]))]
    found = [(prefix.rstrip("_") or "example", list(row[f"{prefix}input_ids"]), list(row.get(f"{prefix}labels") or []))
             for prefix in ("", "chosen_", "rejected_") if f"{prefix}input_ids" in row]
    if not found and isinstance(row.get("prompt"), str):  # GRPO: the prompt text; the completions are generated
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        found = [("prompt", ids, [])]
    return [(name, ids, labels or [IGNORE] * len(ids)) for name, ids, labels in found]


def highlight(ids: list[int], labels: list[int], tokenizer):
    """rich Text of the decoded tokens: runs of trained tokens in TRAINED_STYLE, the rest in PROMPT_STYLE."""
    from rich.text import Text

    text, run, trained = Text(), [], None
    for token, label in zip(ids, labels):
        if run and (label != IGNORE) != trained:
            text.append(tokenizer.decode(run), TRAINED_STYLE if trained else PROMPT_STYLE)
            run = []
        run.append(token)
        trained = label != IGNORE
    if run:
        text.append(tokenizer.decode(run), TRAINED_STYLE if trained else PROMPT_STYLE)
    return text


def show(console, summary: dict, rows: list[dict], tokenizer) -> None:
    from rich.table import Table

    table = Table(title=f"mode=preview · method={summary['method']} · template={summary['template']} · "
                        f"{summary['skipped_records']} record(s) skipped")
    splits = summary["splits"]
    table.add_column("per split")
    for name in splits:
        table.add_column(name, justify="right")
    for key in sorted({k for stats in splits.values() for k in stats}):  # the builders' own counts and the totals above
        table.add_row(key, *(str(stats.get(key, "-")) for stats in splits.values()))
    console.print(table)
    for i, row in enumerate(rows):
        for name, ids, labels in sequences(row, tokenizer):
            trained = sum(1 for t in labels if t != IGNORE)
            console.rule(f"train example {i} · {name} · {len(ids)} tokens, {trained} trained")
            console.print(highlight(ids, labels, tokenizer))
    console.print(f"[{TRAINED_STYLE}]trained tokens[/] · [{PROMPT_STYLE}]prompt (not trained)[/]")


def length_histogram(lengths: dict[str, list[int]], max_length: int, path: Path, method: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    top = max([max(v) for v in lengths.values() if v] + [max_length])
    bins = list(range(0, top + max(1, top // 40) + 1, max(1, top // 40)))
    for name, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{name} ({len(values)} sequences)")
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"method.max_length = {max_length}")
    ax.set(xlabel="tokens per sequence", ylabel="sequences", title=f"token lengths · method={method}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
