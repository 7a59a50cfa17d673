"""Small statistics for evaluation results: Wilson intervals, means, and exact paired tests (McNemar / sign test)."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval [lo, hi] for `correct` successes out of `n` (95% by default; [0, 1] for n = 0).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n. 50/100 -> [0.404, 0.596].
    """
    if n <= 0:
        return [0.0, 1.0]
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for the discordant pairs of a paired comparison: `b` questions right before
    and wrong after, `c` wrong before and right after. Under "no change" each discordant pair goes either way with
    probability 1/2, so p = P(|X - n/2| >= |b - n/2|) for X ~ Binomial(n = b + c, 1/2) (1.0 when nothing changed).
    b=10, c=2 -> 0.0386. scipy's binomtest computes it (scipy is installed with transformers' stack; no statsmodels)."""
    if b < 0 or c < 0:
        raise ValueError("counts must be >= 0")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def paired(before: dict[str, float], after: dict[str, float], binary: bool) -> dict:
    """Per-question scores of the same questions, before (baseline) and after, keyed by question id.

    binary (correct 0/1, MCQ): the exact McNemar test on the discordant questions (b: right -> wrong, c: wrong -> right).
    otherwise (e.g. ROUGE-L, a judge's score): the exact sign test, which is the same binomial test on the questions
    that got worse (b) and better (c); ties drop out. Only ids in both are compared (`n`)."""
    ids = [k for k in after if k in before and before[k] is not None and after[k] is not None]
    b = sum(after[k] < before[k] for k in ids)
    c = sum(after[k] > before[k] for k in ids)
    mean_before = mean(before[k] for k in ids)
    mean_after = mean(after[k] for k in ids)
    return {"n": len(ids), "before": mean_before, "after": mean_after,
            "difference": None if mean_before is None else mean_after - mean_before,
            "test": "mcnemar_exact" if binary else "sign_exact", "worse": b, "better": c, "p_value": mcnemar_exact(b, c)}
