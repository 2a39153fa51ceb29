"""Ablations of PVC at CPU scale (paper section 4.4, Table 4): WTC pooling, WTC placement, RPE patch size.

``python -m llava_uhd.bench ablate --set pooling|placement|patch|all [--seeds 3] [--jobs 2] [--steps N]``
trains the pilot's PVC model (``configs/pilot/pvc.yaml``: tiny ViT-UHD + mlp projector + tiny Qwen2, stage
3) once per overlay of the chosen set (``configs/ablations/<name>.yaml``) and seed, on the pilot's
fixed-layout ShapeGrid data (``llava_uhd.bench.pilot``: seeds, ``--task``, ``--reuse``, ``--jobs``, the data
manifest, the run records and the folder locks work as there), and tabulates held-out exact-match accuracy
(mean and std over seeds) against cost: encoder FLOPs at the pilot image size
(``llava_uhd.vision.report.encoder_flops``, counted on the meta device), visual tokens reaching the LLM, and
training wall time.

Sets (tiny ViT: 6 blocks; the paper's SO400M has 27 with WTC after blocks 4 and 18):

- ``pooling``: ``pooling_avg``, ``pooling_content_adaptive`` (the paper's), ``pooling_pixel_unshuffle``.
- ``placement``: ``wtc_early`` [1, 2], ``wtc_paper`` [2, 4] (4/27 and 18/27 of the depth scale to 0.9 and
  4.0 of 6 blocks, i.e. one early and one two-thirds-deep WTC), ``wtc_late`` [5, 6].
- ``patch``: RPE patch ``patch14``, ``patch12``, ``patch10`` (the paper's), ``patch8``.
- ``prealign``: stage-1 pre-alignment (``PreAlignment``: patch embedding, WTC and projector train, ViT blocks and
  LLM frozen; ``--prealign-steps``, on the same data and seed) before the run or not, crossed with the WTC gate
  as this project initialises it (live: W2 = b2 = 0, W1 random) or as the released model's loader leaves it (dead:
  every gate parameter zero, ``model.zero_wtc_gate``: average pooling with exactly zero gradient):
  ``prealign_off_live`` (the pilot's PVC arm), ``prealign_off_dead``, ``prealign_on_live``, ``prealign_on_dead``.
- ``where-compress``: the same patch-10 ViT and ``mlp`` projector, only where and how the 16x reduction happens:
  ``compress_inside`` (ViT-UHD: content-adaptive WTC after blocks 2 and 4), ``compress_after_content_adaptive``,
  ``compress_after_avg``, ``compress_after_pixel_unshuffle`` (no compression inside the ViT; two 2x2 WTC steps
  after its last block: ``wtc_layers [6, 6]``; two 2x2 means are the 4x4 mean), and ``gne_mlp`` (the GNE at patch
  14 with the same ``mlp`` projector, no reduction at all: the pilot's GNE arm without its merger).

Outputs in ``--out``, ``<stem> = ablate_<set>_<task>``: ``<stem>.csv`` (one row per config), ``<stem>_seeds.csv``,
``.json``, ``.md``, ``.png`` (accuracy vs encoder GFLOPs: per-seed points, mean +- std), ``_loss.png`` (training
loss per run; ``learned_at_step`` as in the pilot) and ``seeds/<stem>/<config>_seed<s>.json``. The
paper's defaults appear once per set (``pooling_content_adaptive`` = ``wtc_paper`` = ``patch10``): each set
trains its own run so that a set stands alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from llava_uhd.arguments import positive_int
from llava_uhd.bench.pilot import (
    CONFIGS,
    add_shared_arguments,
    chance,
    check,
    make_jobs,
    pilot_configs,
    prepare,
    run_jobs,
)
from llava_uhd.bench.runs import RunError

SETS: dict[str, tuple[str, ...]] = {
    "pooling": ("pooling_avg", "pooling_content_adaptive", "pooling_pixel_unshuffle"),
    "placement": ("wtc_early", "wtc_paper", "wtc_late"),
    "patch": ("patch14", "patch12", "patch10", "patch8"),
    "prealign": ("prealign_off_live", "prealign_off_dead", "prealign_on_live", "prealign_on_dead"),
    "where-compress": ("compress_inside", "compress_after_content_adaptive", "compress_after_avg",
                       "compress_after_pixel_unshuffle", "gne_mlp"),
}
PREALIGN_STAGE = CONFIGS / "ablations" / "prealign_stage.yaml"
"""The overlay that turns a run's configs into its pre-alignment run (stage 1's module over the same stack)."""


def prealign_configs(name: str) -> list[Path]:
    """The configs of the pre-alignment run trained before config ``name`` (none unless it is ``prealign_on_*``)."""
    return [*ablation_configs(name), PREALIGN_STAGE] if name.startswith("prealign_on_") else []


def ablation_configs(name: str) -> list[Path]:
    """The pilot's PVC arm plus the ablation overlay."""
    return [*pilot_configs("pvc"), CONFIGS / "ablations" / f"{name}.yaml"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", choices=[*SETS, "all"], default="pooling", dest="ablation")
    parser.add_argument("--configs", nargs="+", metavar="NAME",
                        help="only these configs of the chosen set(s) (default: all), e.g. to re-run one")
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps per run")
    parser.add_argument("--prealign-steps", type=positive_int, default=500,
                        help="steps of the pre-alignment run before a prealign_on_* config (set prealign)")
    parser.add_argument("--out", default="docs/ablations")
    parser.add_argument("--runs", default="runs/ablations", help="where the trained runs go (per task, config, seed)")
    add_shared_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from llava_uhd.bench.report import write_ablate

    problem = check(args)
    if problem:
        print(f"bench ablate: {problem}", file=sys.stderr)
        return 2
    sets = list(SETS) if args.ablation == "all" else [args.ablation]
    known = [name for s in sets for name in SETS[s]]
    unknown = [name for name in args.configs or [] if name not in known]
    if unknown:
        print(f"bench ablate: --configs: {', '.join(unknown)} not in set {args.ablation} ({', '.join(known)})",
              file=sys.stderr)
        return 2
    try:
        for task in args.tasks:
            with ExitStack() as locks:  # the task's data and run folders, held until its tables are written
                data = prepare(args, task, locks)
                spec = next(iter(data.values()))[0]
                for set_name in sets:
                    names = [name for name in SETS[set_name] if not args.configs or name in args.configs]
                    if not names:
                        continue
                    started = time.perf_counter()
                    jobs = make_jobs(args, names, ablation_configs, data, Path(args.runs) / task,
                                     labels=lambda name, s=set_name: {"set": s}, flops=True,
                                     prealign=prealign_configs, prealign_steps=args.prealign_steps)
                    records = run_jobs(jobs, args.reuse, args.jobs, locks)
                    info = {"command": args.command_line, "set": set_name,
                            "task": task, "steps": args.steps, "seeds": list(data), "jobs": args.jobs,
                            "threads": args.threads, "data": asdict(spec), "chance": chance(spec),
                            "prealign_steps": args.prealign_steps if set_name == "prealign" else None,
                            "total_s": round(time.perf_counter() - started, 1)}
                    write_ablate(Path(args.out), f"ablate_{set_name}_{task}", records, info)
    except (RunError, OSError) as err:
        print(f"bench ablate: {err}", file=sys.stderr)
        return 1
    return 0
