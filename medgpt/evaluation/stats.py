"""Small statistics for evaluation results (no numpy needed)."""

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
