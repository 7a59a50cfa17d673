"""plots/loss.png: raw and smoothed training loss with eval loss on the same axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, bias-corrected so the curve starts at the first value."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(rows: list[dict], out: Path, title: str = "") -> Path | None:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="eval loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_overlay(curves: list[tuple[str, list[dict]]], out: Path, title: str = "") -> Path | None:
    """Several runs on one axes: each run's smoothed training loss (line) and eval loss (dots), one colour per run."""
    curves = [(label, rows) for label, rows in curves if any("loss" in r or "eval_loss" in r for r in rows)]
    if not curves:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, rows) in enumerate(curves):
        colour = colours(i % colours.N)
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        label = label if len(label) <= 60 else label[:57] + "..."
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, smooth(list(losses)), color=colour, linewidth=1.8, label=label)
        if evals:
            steps, losses = zip(*evals)
            ax.plot(steps, losses, "o--", color=colour, linewidth=1, markersize=4, label=None if train else label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (line: train, smoothed; dots: eval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
