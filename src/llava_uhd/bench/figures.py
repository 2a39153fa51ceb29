"""Figures of ``bench pilot`` / ``bench ablate`` over seeds: every seed drawn as a point, the mean +- std or a
95 % Wilson interval on top, so that a reader sees the spread and not only one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEARNED_LOSS = 0.05
"""Train loss under which a run counts as having learned the task (see ``pilot.learned_at``)."""


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _jitter(count: int, width: float = 0.18) -> np.ndarray:
    """Fixed horizontal offsets for ``count`` per-seed points (the same picture every time)."""
    return np.linspace(-width, width, count) if count > 1 else np.zeros(1)


def plot_heatmaps(cells: dict[str, np.ndarray], accuracy: dict[str, str], mask: np.ndarray, labels: dict[str, str],
                  title: str, path: Path) -> None:
    """The arms' per-cell accuracy (pooled over seeds) side by side; cells a slice boundary cuts are outlined."""
    from matplotlib.patches import Rectangle

    fig = _figure(4.2 * len(cells), 4.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    image = None
    for ax, (name, values) in zip(axes, cells.items()):
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
        rows, cols = values.shape
        for r in range(rows):
            for c in range(cols):
                if values[r, c] == values[r, c]:
                    ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if values[r, c] > 0.5 else "white")
                if mask[r, c]:
                    ax.add_patch(Rectangle((c - 0.44, r - 0.44), 0.88, 0.88, fill=False, edgecolor="red",
                                           linestyle="--", linewidth=1.2))
        ax.set_xticks(range(cols), [str(c + 1) for c in range(cols)])
        ax.set_yticks(range(rows), [str(r + 1) for r in range(rows)])
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        ax.set_title(f"{labels.get(name, name)}\naccuracy {accuracy[name]}", fontsize=9)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_spread(rows: list[dict], summaries: list[dict], labels: dict[str, str], chance: float, title: str,
                path: Path) -> None:
    """Left: accuracy per arm, one point per seed, mean +- std. Right: cut vs uncut cells, pooled accuracy with
    its 95 % Wilson interval, and the per-seed values as small points."""
    fig = _figure(10, 4.2)
    left, right = fig.subplots(1, 2)
    names = [s["name"] for s in summaries]
    for x, summary in enumerate(summaries):
        seeds = [r["accuracy"] for r in rows if r["name"] == summary["name"]]
        left.scatter(x + _jitter(len(seeds)), seeds, s=18, color="C0", alpha=0.6, zorder=2)
        std = summary["accuracy_std"] or 0.0
        left.errorbar(x + 0.3, summary["accuracy_mean"], yerr=std, fmt="D", color="black", capsize=4, zorder=3)
        for offset, part, colour in ((-0.15, "cut", "C3"), (0.15, "uncut", "C2")):
            value = summary[f"accuracy_{part}"]
            per_seed = [r[f"{part}_correct"] / r[f"{part}_total"] for r in rows
                        if r["name"] == summary["name"] and r[f"{part}_total"]]
            right.scatter(np.full(len(per_seed), x + offset), per_seed, s=10, color=colour, alpha=0.4, zorder=2)
            if value is not None:
                lo, hi = summary[f"accuracy_{part}_lo"], summary[f"accuracy_{part}_hi"]
                err = [[max(0.0, value - lo)], [max(0.0, hi - value)]]
                right.errorbar(x + offset, value, yerr=err, fmt="o", color=colour, capsize=4, zorder=3,
                               label=f"{part} cells (pooled, 95% Wilson)" if x == 0 else None)
    for ax in (left, right):
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
        ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=7, rotation=15)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3, axis="y")
    left.set_ylabel("held-out exact-match accuracy")
    left.set_title("per seed (points), mean ± std (diamond)", fontsize=9)
    right.set_title(f"cut vs uncut cells; chance {chance:.3f} dotted", fontsize=9)
    right.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_losses(curves: dict[str, list[list[tuple[int, float]]]], labels: dict[str, str], title: str,
                path: Path) -> None:
    """Train loss against step, one colour per arm, one thin line per seed, log scale."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    for index, (name, runs) in enumerate(curves.items()):
        for k, curve in enumerate(c for c in runs if c):
            steps, values = zip(*curve)
            ax.plot(steps, values, color=f"C{index}", linewidth=0.9, alpha=0.7,
                    label=labels.get(name, name) if k == 0 else None)
    ax.axhline(LEARNED_LOSS, color="grey", linestyle=":", linewidth=1, label=f"learned: loss < {LEARNED_LOSS}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_cost(rows: list[dict], summaries: list[dict], title: str, path: Path, chance: float) -> None:
    """Accuracy vs encoder GFLOPs: per-seed points, mean +- std per config, one colour per ablation set."""
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    sets = list(dict.fromkeys(s["set"] for s in summaries))
    for summary in summaries:
        colour = f"C{sets.index(summary['set'])}"
        seeds = [r["accuracy"] for r in rows if r["name"] == summary["name"]]
        ax.scatter(np.full(len(seeds), summary["encoder_gflops"]), seeds, s=14, color=colour, alpha=0.45)
        ax.errorbar(summary["encoder_gflops"], summary["accuracy_mean"], yerr=summary["accuracy_std"] or 0.0,
                    fmt="D", color=colour, capsize=4,
                    label=summary["set"] if summary is next(s for s in summaries if s["set"] == summary["set"])
                    else None)
        ax.annotate(summary["name"], (summary["encoder_gflops"], summary["accuracy_mean"]), fontsize=7,
                    xytext=(5, 3), textcoords="offset points")
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xlabel("encoder GFLOPs per image (meta device)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_ylim(-0.03, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
