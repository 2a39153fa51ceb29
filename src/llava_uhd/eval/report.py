"""Scores of a predictions file, written as ``scores.json``, markdown + CSV tables and a bar chart; and the
results table across benchmarks and runs (the shape of the paper's Table 2: one row per run, one column per
benchmark, each cell the benchmark's headline number).

Files in the output folder: ``<bench>_scores.json`` / ``.md`` / ``.csv`` / ``.png`` per benchmark, and
``scores.json`` holding every benchmark scored into that folder (``table`` reads it).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from llava_uhd.bench.report import markdown_table
from llava_uhd.errors import EvalError

from .run import read_predictions
from .scoring import aggregate, score_row
from .tsv import Benchmark

SCORES_NAME = "scores.json"


def match_predictions(benchmark: Benchmark, records: Sequence[dict], source: str) -> list[tuple[dict, str]]:
    """(row, prediction) pairs in file order; unknown or repeated indices are an error naming them."""
    seen: dict[str, int] = {}
    unknown, duplicates = [], []
    for number, record in enumerate(records, start=1):
        index = str(record["index"])
        if index not in benchmark.by_index:
            unknown.append(index)
        elif index in seen:
            duplicates.append(f"{index} (records {seen[index]} and {number})")
        else:
            seen[index] = number
    if unknown:
        raise EvalError(f"{source}: {len(unknown)} prediction(s) for indices not in {benchmark.path}: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if duplicates:
        raise EvalError(f"{source}: {len(duplicates)} index(es) predicted twice: {', '.join(duplicates[:5])}")
    by_index = {str(r["index"]): r["prediction"] for r in records}
    return [(row, str(by_index[row["index"]] or "")) for row in benchmark.rows if row["index"] in by_index]


def score_predictions(benchmark: Benchmark, predictions: str | Path, limit: int | None = None) -> dict:
    """The benchmark's scores (see :func:`llava_uhd.eval.scoring.aggregate`) from a predictions file. Every row
    (the first ``limit``, plus any other row predicted) is in the numbers: one without a prediction counts as
    wrong, and ``counts["missing"]`` says how many."""
    if not benchmark.has_answers:
        raise EvalError(f"{benchmark.path}: no 'answer' column, nothing to score against (a test split?)")
    pairs = match_predictions(benchmark, read_predictions(predictions), str(predictions))
    if not pairs:
        raise EvalError(f"{predictions}: no predictions to score")
    answered = {row["index"] for row, _ in pairs}
    missing = [row for row in benchmark.rows[:limit] if row["index"] not in answered]
    return aggregate(benchmark, [(row, score_row(benchmark, row, text)) for row, text in pairs], missing)


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def score_rows(scores: dict) -> tuple[list[str], list[list]]:
    """Header and rows of the per-category table (first row: overall)."""
    metrics = list(scores["overall"])
    for values in scores["per_category"].values():
        metrics += [m for m in values if m not in metrics and m != "count"]
    header = ["category", *metrics, "count"]
    rows = [["overall", *[scores["overall"].get(m, "") for m in metrics], scores["counts"]["rows"]]]
    for category, values in scores["per_category"].items():
        rows.append([category, *[values.get(m, "") for m in metrics], values.get("count", "")])
    return header, rows


def write_scores(scores: dict, out_dir: str | Path) -> list[Path]:
    """Per-benchmark json / md / csv / png, and the benchmark merged into ``out_dir/scores.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = scores["benchmark"]
    header, rows = score_rows(scores)
    counts = scores["counts"]
    note = (f"{name} ({scores['kind']}): {counts['rows']} rows scored, {counts['missing']} of them without a "
            f"prediction (counted wrong), {counts['unparseable']} unparseable answers.\n\n")
    paths = [out_dir / f"{name}_scores.{ext}" for ext in ("json", "md", "csv", "png")]
    paths[0].write_text(json.dumps(scores, indent=2, ensure_ascii=False))
    paths[1].write_text(note + markdown_table(header, rows, _fmt) + "\n")
    with paths[2].open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    _bar_chart(scores, paths[3])
    merged_path = out_dir / SCORES_NAME
    merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
    merged[name] = scores
    merged_path.write_text(json.dumps(merged, indent=2, ensure_ascii=False))
    return [*paths, merged_path]


CATEGORY_METRIC = {"mme": "score", "ocrbench": "score", "hallusion": "aAcc"}
"""The per-category number charted where it is not the headline (MME: acc + acc+; OCRBench: hits)."""


def _bar_chart(scores: dict, path: Path) -> None:
    """Headline overall (first bar) and per category; kinds whose category number differs chart categories only."""
    from matplotlib.figure import Figure

    headline = scores["headline"]
    metric = CATEGORY_METRIC.get(scores["kind"], headline)
    labels = [c for c, v in scores["per_category"].items() if metric in v]
    values = [scores["per_category"][c][metric] for c in labels]
    title = f"{scores['benchmark']}: {metric} per category"
    if metric == headline:
        labels, values = ["overall", *labels], [scores["overall"][headline], *values]
    else:
        title += f" ({headline} {scores['overall'][headline]:.2f})"
    fig = Figure(figsize=(max(4.0, 0.5 * len(labels) + 2), 3.2))
    ax = fig.subplots()
    colours = ["tab:blue" if label == "overall" else "tab:gray" for label in labels]
    ax.bar(range(len(labels)), values, color=colours)
    ax.set_xticks(range(len(labels)), [label[:24] for label in labels], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    if scores["kind"] not in ("mme", "ocrbench"):  # percentages
        ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def results_table(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Markdown table (runs x benchmarks, headline numbers) and a grouped bar chart (MME and OCRBench
    scaled to 0-100), from each run's ``scores.json``; written as ``results.md`` / ``results.csv`` /
    ``results.png`` in ``out`` (default: the first run folder)."""
    runs = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / SCORES_NAME
        if not path.is_file():
            raise EvalError(f"{run_dir}: no {SCORES_NAME} (score a predictions file into it first)")
        try:
            runs[str(run_dir)] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}: not valid JSON ({err})") from err
    benchmarks = sorted({b for scores in runs.values() for b in scores})
    header = ["run", *[f"{b} ({next(s[b]['headline'] for s in runs.values() if b in s)})" for b in benchmarks]]
    names = [Path(run).name or run for run in runs]
    if len(set(names)) < len(names):  # folders with the same name: show the paths as given
        names = list(runs)
    rows = [[name, *[s[b]["overall"][s[b]["headline"]] if b in s else "" for b in benchmarks]]
            for name, s in zip(names, runs.values())]
    out = Path(out) if out is not None else Path(run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(header, rows, _fmt) + "\n"
    (out / "results.md").write_text(text)
    with (out / "results.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    kinds = [next(s[b]["kind"] for s in runs.values() if b in s) for b in benchmarks]
    _grouped_chart(benchmarks, kinds, rows, out / "results.png")
    return text, [out / "results.md", out / "results.csv", out / "results.png"]


CHART_SCALE = {"mme": 28.0, "ocrbench": 10.0}
"""Headline points -> 0-100 for the cross-benchmark chart: MME's total is out of 2800, OCRBench's out of 1000."""


def _grouped_chart(benchmarks: Sequence[str], kinds: Sequence[str], rows: Sequence[Sequence], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(benchmarks) + 2), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for r, row in enumerate(rows):
        values = [v / CHART_SCALE.get(k, 1.0) if isinstance(v, int | float) else 0.0 for v, k in zip(row[1:], kinds)]
        ax.bar([b + r * width for b in range(len(benchmarks))], values, width, label=str(row[0]))
    names = [f"{b} (/{CHART_SCALE[k]:g})" if k in CHART_SCALE else b for b, k in zip(benchmarks, kinds)]
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(benchmarks))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("headline score (0-100)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
