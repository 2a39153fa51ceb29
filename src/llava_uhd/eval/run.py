"""The prediction loop: one answer per benchmark row, appended to ``<out>/<bench>_predictions.jsonl``.

Resumable by construction: rows already in the file are skipped, and each answer is written and flushed as
soon as it exists, so a killed run loses at most the batch in flight (a half-written last line, from a kill
mid-write, is dropped on restart). A row whose image cannot be read is skipped, named in the log and
counted in ``<out>/<bench>_run.json`` (with throughput: rows/s and the share of time spent generating).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from llava_uhd.errors import EvalError

from .generation import generate_batch
from .prompts import build_prompt
from .tsv import Benchmark

log = logging.getLogger(__name__)

DEFAULT_NUM_BEAMS = 3
"""The release's evaluation setting (beam search with 3 beams)."""
DEFAULT_MAX_NEW_TOKENS = 512
"""The release's evaluation cap; short answers stop at the end-of-turn token long before it."""


def predictions_path(out_dir: str | Path, benchmark: str) -> Path:
    return Path(out_dir) / f"{benchmark}_predictions.jsonl"


def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a predictions file, in file order. A broken *last* line (a kill mid-write) is dropped, and
    with ``repair`` cut from the file; a broken line elsewhere is an error naming it."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"--predictions {path}: a folder, not a predictions file (<out>/<bench>_predictions.jsonl)")
    if not path.is_file():
        raise EvalError(f"predictions file not found: {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, offset = [], 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)  # the piece after the final newline: a record is written with its newline
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "index" not in record or "prediction" not in record:
                    raise ValueError("a record needs 'index' and 'prediction'")
            except ValueError as err:
                if not last:
                    raise EvalError(f"{path} line {number}: not a prediction record ({err})") from err
                log.warning("%s: dropping a half-written last line (%d bytes)", path, len(line))
                if repair:
                    with path.open("r+b") as handle:
                        handle.truncate(offset)
                break
            records.append(record)
        offset += len(line) + 1
    return records


@dataclass
class RunStats:
    benchmark: str
    rows: int
    answered_before: int
    answered_now: int
    skipped: dict[str, str]
    seconds: float
    generate_seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.answered_now / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark, "rows": self.rows, "answered_before": self.answered_before,
            "answered_now": self.answered_now, "skipped": len(self.skipped), "skipped_rows": self.skipped,
            "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 3),
            "generate_share": round(self.generate_seconds / self.seconds, 4) if self.seconds > 0 else 0.0,
        }


def check_settings(settings_path: Path, predictions: Path, settings: dict) -> None:
    """Resume only under the settings the file's answers were made with: a rerun with other beams or another
    cap would append answers of a different run to the same file without a word."""
    if predictions.exists() and predictions.stat().st_size and settings_path.is_file():
        try:
            before = json.loads(settings_path.read_text())
        except ValueError:
            before = None
        changed = [f"{k} {before[k]} -> {v}" for k, v in settings.items() if isinstance(before, dict)
                   and k in before and before[k] != v]
        if changed:
            raise EvalError(f"{predictions} was answered with other settings ({', '.join(changed)}); "
                            "rerun with the same settings to resume, or give another --out")
    settings_path.write_text(json.dumps(settings, indent=2))


def run_benchmark(
    model,
    benchmark: Benchmark,
    out_dir: str | Path,
    batch_size: int = 1,
    num_beams: int = DEFAULT_NUM_BEAMS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    progress: bool = True,
) -> RunStats:
    """Answer the rows of ``benchmark`` (the first ``limit``) that the predictions file does not hold yet."""
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise EvalError("--batch-size, --num-beams and --max-new-tokens must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = predictions_path(out_dir, benchmark.name)
    check_settings(out_dir / f"{benchmark.name}_settings.json", path,
                   {"num_beams": num_beams, "max_new_tokens": max_new_tokens})
    done = {str(r["index"]) for r in read_predictions(path, repair=True)} if path.exists() else set()
    rows = benchmark.rows[:limit] if limit is not None else benchmark.rows
    todo = [row for row in rows if row["index"] not in done]
    skipped: dict[str, str] = {}
    start = time.perf_counter()
    generating = 0.0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=benchmark.name, unit="row", disable=not progress,
               dynamic_ncols=True)
    with path.open("a", encoding="utf-8") as handle:
        for first in range(0, len(todo), batch_size):
            batch, images, prompts = [], [], []
            for row in todo[first: first + batch_size]:
                try:
                    image = benchmark.load_image(row)
                except EvalError as err:
                    skipped[row["index"]] = str(err)
                    log.warning("skipping %s", err)
                    bar.update(1)
                    continue
                batch.append(row)
                images.append(image)
                prompts.append(build_prompt(benchmark, row))
            if not batch:
                continue
            began = time.perf_counter()
            answers = generate_batch(model, images, prompts, max_new_tokens, num_beams)
            generating += time.perf_counter() - began
            for row, prompt, answer in zip(batch, prompts, answers):
                handle.write(json.dumps({"index": row["index"], "prediction": answer, "prompt": prompt},
                                        ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
            elapsed = time.perf_counter() - start
            bar.set_postfix(rows_per_s=f"{(first + len(batch)) / elapsed:.2f}", generate=f"{generating / elapsed:.0%}")
    bar.close()
    stats = RunStats(benchmark.name, len(rows), len(rows) - len(todo), len(todo) - len(skipped), skipped,
                     time.perf_counter() - start, generating)
    (out_dir / f"{benchmark.name}_run.json").write_text(json.dumps(stats.to_dict(), indent=2))
    return stats


def run_benchmarks(model, benchmarks: Sequence[Benchmark], out_dir: str | Path, **kwargs) -> list[RunStats]:
    return [run_benchmark(model, benchmark, out_dir, **kwargs) for benchmark in benchmarks]
