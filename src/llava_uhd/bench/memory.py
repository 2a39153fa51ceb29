"""``python -m llava_uhd.bench memory -c configs/stage3.yaml [-c configs/lora.yaml] [--gpus N] [--strategy ddp|fsdp2]``:
per-GPU memory of a training run, full fine-tune vs LoRA vs QLoRA, with and without activation checkpointing, as
:mod:`llava_uhd.bench.memory_plan` plans it on the meta device; ``--check DIR`` measures small configs against the
plan (:mod:`llava_uhd.bench.memory_check`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from llava_uhd.arguments import positive_int
from llava_uhd.bench.memory_plan import GIB, MODES, Estimate, RunShape, per_gpu, plan
from llava_uhd.errors import SettingsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", action="append", default=[], help="training config (repeatable, as "
                        "for src/main.py; configs/base.yaml is read first)")
    parser.add_argument("--check", default=None, metavar="DIR", help="instead: check the planner against measured "
                        "CPU runs of small configs; writes DIR/memory.csv, memory.png and README.md's table")
    parser.add_argument("--gpus", type=_positives, default=[1], help="GPUs the run is spread over (default 1; a "
                        "comma-separated list prints a table for each)")
    parser.add_argument("--strategy", type=_strategies, default=["ddp"], help="ddp or fsdp2: how the GPUs share "
                        "the work (ddp,fsdp2: both)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of full,lora,qlora")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")


def _positives(text: str) -> list[int]:
    return [positive_int(t.strip()) for t in text.split(",")]


def _strategies(text: str) -> list[str]:
    found = [t.strip() for t in text.split(",")]
    if not all(t in ("ddp", "fsdp2") for t in found):
        raise argparse.ArgumentTypeError(f"expected ddp, fsdp2 or ddp,fsdp2, got {text!r}")
    return found


# -- settings ------------------------------------------------------------------------------------------------------
def table(shape: RunShape, estimates: list[Estimate], gpus: int, strategy: str) -> str:
    unit, name = (GIB, "GiB") if max(e.total for e in estimates) >= GIB else (1024**2, "MiB")
    lines = [f"model: {shape.source}",
             f"per GPU, {gpus} GPU{'s' if gpus > 1 else ''} ({strategy}), precision {shape.precision}, batch of "
             f"{estimates[0].tokens} LLM tokens (images {shape.side}x{shape.side} px); {name}",
             "| mode | act. ckpt | trainable params | weights | gradients | optimizer | activations | total |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in estimates:
        cells = " | ".join(f"{v / unit:.2f}" for v in (e.weights, e.gradients, e.optimizer, e.activations, e.total))
        lines.append(f"| {e.mode} | {'on' if e.checkpointing else 'off'} | {e.trainable:,} | {cells} |")
    lines.append("total: the traced peak (gradients and activations do not peak together, so it is less than the "
                 "sum of the columns)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The command: a mistake in a setting or an option is one ``error: ...`` line and exit status 2; an output that
    cannot be written, exit status 1."""
    try:
        return _run(args)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # --check / --json: a folder or file that cannot be written
        print(f"error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.check is not None:
        from llava_uhd.bench.memory_check import check  # loads what only the measurement needs

        check(args.check)
        return 0
    if not args.config:
        raise SettingsError("-c: give the run's config files (e.g. -c configs/stage3.yaml -c configs/lora.yaml)")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SettingsError(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")
    layouts = [(g, s) for g in args.gpus for s in args.strategy]
    if any(g == 1 and s == "fsdp2" for g, s in layouts) and all(g == 1 for g in args.gpus):
        raise SettingsError("--strategy fsdp2: shards over 2 or more GPUs; give --gpus N")
    shape, traces = plan(args.config, modes)
    out = []
    for gpus, strategy in layouts:
        if gpus == 1 and strategy != args.strategy[0]:
            continue  # one GPU: no strategy to compare
        estimates = [per_gpu(t, gpus, strategy) for t in traces if not (strategy == "fsdp2" and t.mode == "qlora")]
        print(table(shape, estimates, gpus, strategy if gpus > 1 else "one GPU"))
        if strategy == "fsdp2" and "qlora" in modes:
            print("(QLoRA is refused under FSDP2: bitsandbytes' 4-bit weights are not sharded here)")
        print()
        out += [{"gpus": gpus, "strategy": strategy, **dataclasses.asdict(e)} for e in estimates]
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0
