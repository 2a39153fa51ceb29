"""Tables of the benchmarks: the one markdown-table and CSV writer every benchmark and report uses, and the
files of ``bench pilot`` / ``bench ablate`` from their per-run records (``result.json``).

Per arm (or ablation config) a summary row (``stats.summarize``), per run a seed row, per run a JSON copy of
its record under ``seeds/<stem>/`` in the output folder: what a reader needs to check a claim against the runs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava_uhd.bench.figures import plot_cost, plot_heatmaps, plot_losses, plot_spread
from llava_uhd.bench.stats import fmt, interval_cell, learned_cell, mean_pm, summarize

SEED_KEYS = ["name", "seed", "accuracy", "learned_at_step", "cut_correct", "cut_total", "uncut_correct",
             "uncut_total", "image_tokens", "train_s", "eval_s", "threads", "commit", "dirty", "diff_sha",
             "config_hash", "steps", "trained_steps", "data_hash", "tokenizer_hash", "platform_hash", "answers_sha",
             "reused"]
"""Columns of the per-seed table (``<stem>_seeds.csv``)."""


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], fmt: Callable[[Any], str] = str) -> str:
    """A GitHub markdown table (no trailing newline); ``fmt`` turns each cell into its text."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: Iterable[dict], fields: Sequence[str], digits: int | None = None) -> None:
    """``rows`` as CSV with the columns ``fields`` (other keys left out, missing ones empty); floats rounded to
    ``digits`` decimals when given."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            if digits is not None:
                row = {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}
            writer.writerow(row)


def summaries(records: list[dict], extra=lambda first: {}) -> list[dict]:
    """One summary per name, in the order the names first appear, with ``extra(first record)`` merged in."""
    names = list(dict.fromkeys(r["name"] for r in records))
    out = []
    for name in names:
        rows = [r for r in records if r["name"] == name]
        first = rows[0]
        out.append({**summarize(rows, name), "image_tokens": first["image_tokens"], "encoder": first["encoder"],
                    "projector": first["projector"], **extra(first)})
    return out


def seed_rows(records: list[dict]) -> list[list[str]]:
    """The per-seed markdown rows."""
    def part(r, p):
        return f"{r[f'{p}_correct'] / r[f'{p}_total']:.3f}" if r[f"{p}_total"] else "n/a"

    return [[r["name"], str(r["seed"]), f"{r['accuracy']:.3f}",
             "not reached" if r["learned_at_step"] is None else str(r["learned_at_step"]), part(r, "cut"),
             part(r, "uncut"), fmt(r["train_s"], 0), str(r["commit"])[:10] + ("+dirty" if r["dirty"] else ""),
             r["config_hash"], "yes" if r["reused"] else "no"] for r in records]


SEED_HEADER = ["run", "seed", "accuracy", "learned at step", "cut", "uncut", "train s", "commit", "config hash",
               "reused"]


def write_records(out: Path, stem: str, records: list[dict]) -> None:
    """Every run's record as ``seeds/<stem>/<name>_seed<s>.json`` in ``out`` (stale copies of this stem removed)."""
    folder = out / "seeds" / stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    for r in records:
        (folder / f"{r['name']}_seed{r['seed']}.json").write_text(json.dumps(r, indent=1))


def pooled_cells(records: list[dict], name: str) -> np.ndarray:
    """[grid, grid] accuracy of one arm, answers of all its seeds pooled (NaN where no question fell)."""
    rows = [r for r in records if r["name"] == name]
    correct = np.sum([r["cell_correct"] for r in rows], axis=0)
    total = np.sum([r["cell_total"] for r in rows], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def write_pilot(out: Path, stem: str, records: list[dict], mask: np.ndarray, info: dict, labels: dict) -> list[dict]:
    """The pilot's files for one task (see ``llava_uhd.bench.pilot``); returns the per-arm summaries."""
    out.mkdir(parents=True, exist_ok=True)
    arms = summaries(records)
    keys = list(arms[0])
    write_csv(out / f"{stem}.csv", arms, keys)
    write_csv(out / f"{stem}_seeds.csv", records, SEED_KEYS)
    cells = {a["name"]: pooled_cells(records, a["name"]) for a in arms}
    with open(out / f"{stem}_cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["encoder", "row", "col", "cut_by_sbe_slices", "accuracy_pooled_over_seeds"])
        for name, values in cells.items():
            for (r, c), value in np.ndenumerate(values):
                writer.writerow([name, r + 1, c + 1, bool(mask[r, c]), f"{value:.4f}"])
    slim = [{k: v for k, v in r.items() if k not in ("settings", "job", "loss_curve")} for r in records]
    (out / f"{stem}.json").write_text(json.dumps({**info, "summary": arms, "runs": slim,
                                                  "cut_mask": mask.tolist()}, indent=1))
    write_records(out, stem, records)
    header = ["arm", "encoder", "projector", "image tokens", "seeds", "accuracy (mean ± std)", "learned at step",
              "cut cells [95% Wilson]", "uncut cells [95% Wilson]"]
    rows = [[a["name"], a["encoder"], a["projector"], str(a["image_tokens"]), str(a["seeds"]),
             mean_pm(a["accuracy_mean"], a["accuracy_std"]), learned_cell(a), interval_cell(a, "cut"),
             interval_cell(a, "uncut")] for a in arms]
    text = markdown_table(header, rows) + "\n\n" + markdown_table(SEED_HEADER, seed_rows(records))
    (out / f"{stem}.md").write_text(text + "\n")
    spec, task = info["data"], info["task"]
    title = (f"ShapeGrid {spec['grid']}x{spec['grid']} '{task}', {spec['min_side']}-{spec['max_side']} px, "
             f"{info['steps']} steps, seeds {info['seeds']}")
    plot_heatmaps(cells, {a["name"]: mean_pm(a["accuracy_mean"], a["accuracy_std"]) for a in arms}, mask, labels,
                  f"{title}; pooled over seeds; dashed red: cells an SBE slice boundary cuts", out / f"{stem}.png")
    plot_spread(records, arms, labels, info["chance"], title, out / f"{stem}_spread.png")
    curves = {a["name"]: [r["loss_curve"] for r in records if r["name"] == a["name"]] for a in arms}
    plot_losses(curves, labels, f"training loss per seed, {title}", out / f"{stem}_loss.png")
    return arms


COST_KEYS = ("set", "pooling", "wtc_layers", "patch", "input", "encoder_gflops")


def write_ablate(out: Path, stem: str, records: list[dict], info: dict) -> list[dict]:
    """The ablation files for one set and task (see ``llava_uhd.bench.ablate``); returns the per-config summaries."""
    out.mkdir(parents=True, exist_ok=True)
    configs = summaries(records, lambda first: {k: first[k] for k in COST_KEYS})
    write_csv(out / f"{stem}.csv", configs, list(configs[0]))
    write_csv(out / f"{stem}_seeds.csv", records, ["set", *SEED_KEYS, "encoder_gflops"])
    slim = [{k: v for k, v in r.items() if k not in ("settings", "job", "loss_curve")} for r in records]
    (out / f"{stem}.json").write_text(json.dumps({**info, "summary": configs, "runs": slim}, indent=1))
    write_records(out, stem, records)
    header = ["set", "config", "pooling", "wtc_layers", "patch", "input", "image tokens", "encoder GFLOPs", "seeds",
              "accuracy (mean ± std)", "learned at step"]
    rows = [[c["set"], c["name"], str(c["pooling"]), str(c["wtc_layers"]), str(c["patch"]), c["input"],
             str(c["image_tokens"]), fmt(c["encoder_gflops"]), str(c["seeds"]),
             mean_pm(c["accuracy_mean"], c["accuracy_std"]), learned_cell(c)] for c in configs]
    text = markdown_table(header, rows) + "\n\n" + markdown_table(SEED_HEADER, seed_rows(records))
    (out / f"{stem}.md").write_text(text + "\n")
    spec = info["data"]
    title = (f"PVC ablations ({info['set']}), ShapeGrid {spec['grid']}x{spec['grid']} '{info['task']}', "
             f"{info['steps']} steps, seeds {info['seeds']}")
    plot_cost(records, configs, title, out / f"{stem}.png", info["chance"])
    curves = {c["name"]: [r["loss_curve"] for r in records if r["name"] == c["name"]] for c in configs}
    plot_losses(curves, {}, f"training loss per seed, {title}", out / f"{stem}_loss.png")
    return configs
