"""Statistics over seeds for ``bench pilot`` / ``bench ablate``: mean and spread per arm, Wilson intervals.

Accuracy and the learning step are summarised over seeds as mean and *sample* standard deviation (n - 1;
none for a single seed). A run that never learned has no learning step: it is counted ("learned in 3 of 5
runs") and left out of the step's mean, never averaged in as a number. Cut / uncut cell accuracy pools the
held-out answers of all seeds of an arm and gives a 95 % Wilson score interval (no scipy / statsmodels here;
the formula is short): a binomial interval that stays inside [0, 1] and is sane near 0 and 1. The answers of
one seed are not independent of each other (one model), so the interval is a lower bound on the uncertainty;
the seed spread is the other half of the picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of ``values``; (None, None) when empty, std None for one value."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion ``successes / total``; (None, None) when ``total`` is 0."""
    if total <= 0:
        return None, None
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be in [0, {total}], got {successes}")
    p, z2 = successes / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(rows: Sequence[dict], name: str) -> dict:
    """One arm's summary from its per-seed rows (``accuracy``, ``learned_at_step``, ``cut_correct`` /
    ``cut_total``, ``uncut_correct`` / ``uncut_total``)."""
    accuracy, accuracy_std = mean_std([r["accuracy"] for r in rows])
    steps = [r["learned_at_step"] for r in rows if r["learned_at_step"] is not None]
    learned, learned_std = mean_std(steps)
    out = {"name": name, "seeds": len(rows), "accuracy_mean": accuracy, "accuracy_std": accuracy_std,
           "learned_runs": len(steps), "learned_at_mean": learned, "learned_at_std": learned_std}
    for part in ("cut", "uncut"):
        k, n = sum(r[f"{part}_correct"] for r in rows), sum(r[f"{part}_total"] for r in rows)
        lo, hi = wilson(k, n)
        out.update({f"accuracy_{part}": k / n if n else None, f"accuracy_{part}_lo": lo,
                    f"accuracy_{part}_hi": hi, f"{part}_questions": n})
    return out


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, a missing value as "n/a"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def mean_pm(mean, std, digits: int = 3) -> str:
    """"0.812 ± 0.041" (or the mean alone for one seed)."""
    if mean is None:
        return "n/a"
    return fmt(float(mean), digits) + ("" if std is None else f" ± {fmt(float(std), digits)}")


def learned_cell(summary: dict) -> str:
    """"412 ± 80 (4/5 learned)", "not reached (0/5)": runs that never learned are counted, not averaged."""
    k, n = summary["learned_runs"], summary["seeds"]
    if k == 0:
        return f"not reached (0/{n})"
    return f"{mean_pm(summary['learned_at_mean'], summary['learned_at_std'], 0)} ({k}/{n} learned)"


def interval_cell(summary: dict, part: str) -> str:
    """"0.750 [0.69, 0.80]": pooled accuracy and its Wilson interval."""
    value = summary[f"accuracy_{part}"]
    if value is None:
        return "n/a"
    return f"{value:.3f} [{summary[f'accuracy_{part}_lo']:.2f}, {summary[f'accuracy_{part}_hi']:.2f}]"
