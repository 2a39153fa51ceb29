"""``python -m llava_uhd.eval``: benchmarks from local VLMEvalKit TSV files.

    run   --model DIR --data FILE.tsv [--data ...] --out DIR [--batch-size N] [--num-beams 1|3]
          [--max-new-tokens N] [--limit N] [--kind K]   answer every row (resumable), then score
    score --data FILE.tsv --predictions FILE.jsonl [--kind K] [--out DIR]   score without a model
    table DIR [DIR ...] [--out DIR]                     results table across benchmarks and runs
    tiny  --out DIR [--rows N]                          a tiny random model + two drawn TSVs, to try and time `run`

Defaults follow the release's evaluation: ``--num-beams 3``, ``--max-new-tokens 512``, batch size 1. The kind
(how a file is prompted and scored) follows the file name, else option columns A and B mean ``mcq``; the picked
kind is printed, and ``--kind`` overrides it. A row without a prediction counts as wrong, with a warning.
Bad input ends with one message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llava_uhd.arguments import positive_int
from llava_uhd.errors import EvalError

from .run import DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_BEAMS, predictions_path
from .scoring import KINDS

if TYPE_CHECKING:
    from .tsv import Benchmark

log = logging.getLogger("llava_uhd.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.eval",
                                     description="Benchmarks from local VLMEvalKit TSV files: run, score, table.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer every benchmark row with a model, then score", allow_abbrev=False)
    run.add_argument("--model", required=True, help="model folder (LlavaUHD.from_pretrained)")
    run.add_argument("--adapter", default=None, help="a LoRA run's adapter folder, put on --model without merging")
    run.add_argument("--data", required=True, action="append", help="benchmark TSV (repeatable)")
    run.add_argument("--out", required=True, help="output folder for predictions and scores")
    run.add_argument("--batch-size", type=positive_int, default=1)
    run.add_argument("--num-beams", type=positive_int, default=DEFAULT_NUM_BEAMS)
    run.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    run.add_argument("--limit", type=positive_int, default=None, help="only the first N rows of each file")
    run.add_argument("--kind", choices=KINDS, default=None, help="scoring kind (default: from the file name)")
    run.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, ...)")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="cast the model's weights (default: as saved)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    score = sub.add_parser("score", help="score a predictions file (no model)", allow_abbrev=False)
    score.add_argument("--data", required=True, help="benchmark TSV")
    score.add_argument("--predictions", required=True, help="predictions JSONL (index, prediction)")
    score.add_argument("--kind", choices=KINDS, default=None, help="scoring kind (default: from the file name)")
    score.add_argument("--out", default=None, help="output folder (default: the predictions file's folder)")
    table = sub.add_parser("table", help="results table across benchmarks and runs", allow_abbrev=False)
    table.add_argument("runs", nargs="+", help="folders holding a scores.json")
    table.add_argument("--out", default=None, help="where results.md/.csv/.png go (default: the first folder)")
    tiny = sub.add_parser("tiny", help="write a tiny random model and two small drawn benchmark TSVs",
                          allow_abbrev=False)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--rows", type=positive_int, default=64, help="rows per benchmark file")
    return parser


def _summary(scores: dict) -> str:
    """The headline line: ``TextVQA_VAL: accuracy 50.00 (1/2 rows, 1 without a prediction, counted wrong; ...)``."""
    value = scores["overall"][scores["headline"]]
    counts = scores["counts"]
    return (f"{scores['benchmark']}: {scores['headline']} {value:.2f} ({counts['scored']}/{counts['rows']} rows, "
            f"{counts['missing']} without a prediction, counted wrong; {counts['unparseable']} unparseable)")


def _warn_missing(scores: dict, predictions: str | Path) -> None:
    missing = scores["counts"]["missing"]
    if missing:
        log.warning("%s: %d of %d rows have no prediction in %s; each counts as wrong", scores["benchmark"],
                    missing, scores["counts"]["rows"], predictions)


def _say_kind(benchmark: Benchmark) -> None:
    """Name the kind picked from the file (how it is prompted and scored), and how to pick another."""
    if benchmark.kind_reason:
        print(f"{benchmark.name}: kind {benchmark.kind} ({benchmark.kind_reason}; --kind overrides, one of "
              f"{', '.join(KINDS)})")


def cmd_run(args: argparse.Namespace) -> None:
    from .report import score_predictions, write_scores
    from .run import run_benchmark
    from .tsv import read_benchmark

    benchmarks = [read_benchmark(path, args.kind) for path in args.data]  # every file checked before loading
    for benchmark in benchmarks:
        _say_kind(benchmark)
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise EvalError(f"two --data files share a name ({', '.join(names)}): predictions would collide")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: a file, not a folder")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"--model {args.model}: not a model folder (no config.json)")
    import torch

    from llava_uhd.errors import SettingsError
    from llava_uhd.mllm import LlavaUHD

    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise EvalError(f"--adapter {args.adapter}: no adapter folder there")
    try:
        model = LlavaUHD.from_pretrained(model_dir, adapter=args.adapter)
    except SettingsError as err:  # an adapter that is not one, or made for another base
        raise EvalError(f"--adapter {args.adapter}: {str(err).removeprefix('adapter: ')}") from err
    except Exception as err:  # a model folder can be broken in many ways (config keys, shapes, files)
        raise EvalError(f"--model {args.model}: cannot load the model ({type(err).__name__}: {err})") from err
    try:
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None).eval()
    except (RuntimeError, AssertionError) as err:  # unknown device string, or no such device / CUDA build
        raise EvalError(f"--device {args.device}: {err}") from err
    for benchmark in benchmarks:
        stats = run_benchmark(model, benchmark, args.out, batch_size=args.batch_size, num_beams=args.num_beams,
                              max_new_tokens=args.max_new_tokens, limit=args.limit, progress=not args.no_progress)
        info = stats.to_dict()
        print(f"{benchmark.name}: {info['answered_now']} answered now, {info['answered_before']} before, "
              f"{info['skipped']} skipped; {info['rows_per_s']} rows/s, {info['generate_share']:.0%} generating")
        if benchmark.has_answers:
            predictions = predictions_path(args.out, benchmark.name)
            scores = score_predictions(benchmark, predictions, limit=args.limit)
            write_scores(scores, args.out)
            _warn_missing(scores, predictions)
            print(_summary(scores))
        else:
            print(f"{benchmark.name}: not scored (the file has no answer column: a test split)")


def cmd_score(args: argparse.Namespace) -> None:
    from .report import score_predictions, write_scores
    from .tsv import read_benchmark

    benchmark = read_benchmark(args.data, args.kind)
    _say_kind(benchmark)
    scores = score_predictions(benchmark, args.predictions)
    paths = write_scores(scores, args.out or Path(args.predictions).parent)
    _warn_missing(scores, args.predictions)
    print(_summary(scores))
    print(f"wrote {', '.join(str(p) for p in paths)}")


def cmd_table(args: argparse.Namespace) -> None:
    from .report import results_table

    text, paths = results_table(args.runs, args.out)
    print(text, end="")
    print(f"wrote {', '.join(str(p) for p in paths)}")


def cmd_tiny(args: argparse.Namespace) -> None:
    from .tiny import write_tiny

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EvalError(f"--out {args.out}: a file, not a folder")
    for name, path in write_tiny(args.out, args.rows).items():
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"run": cmd_run, "score": cmd_score, "table": cmd_table, "tiny": cmd_tiny}[args.command](args)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable output folder, disk full, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
