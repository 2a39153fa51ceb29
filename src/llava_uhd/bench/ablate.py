"""Ablations of PVC at CPU scale (paper section 4.4, Table 4): WTC pooling, WTC placement, RPE patch size.

``python -m llava_uhd.bench ablate --set pooling|placement|patch|all [--steps N] [--out docs/ablations]``
trains the pilot's PVC model (``configs/pilot/pvc.yaml``: tiny ViT-UHD + mlp projector + tiny Qwen2, stage
3) once per overlay of the chosen set (``configs/ablations/<name>.yaml``), on the pilot's fixed-layout
ShapeGrid data (``llava_uhd.bench.pilot``), and tabulates held-out exact-match accuracy against cost:
encoder FLOPs at the pilot image size (``llava_uhd.vision.report.encoder_flops``, counted on the meta
device), visual tokens reaching the LLM, and training wall time.

Sets (tiny ViT: 6 blocks; the paper's SO400M has 27 with WTC after blocks 4 and 18):

- ``pooling``: ``pooling_avg``, ``pooling_content_adaptive`` (the paper's), ``pooling_pixel_unshuffle``.
- ``placement``: ``wtc_early`` [1, 2], ``wtc_paper`` [2, 4] (4/27 and 18/27 of the depth scale to 0.9 and
  4.0 of 6 blocks, i.e. one early and one two-thirds-deep WTC), ``wtc_late`` [5, 6].
- ``patch``: RPE patch ``patch14``, ``patch12``, ``patch10`` (the paper's), ``patch8``.

Outputs in ``--out``: ``ablate_<set>.csv`` (one row per config), ``.json``, ``.md``, ``.png`` (accuracy vs
encoder GFLOPs) and ``_loss.png`` (training loss per config; ``learned_at_step`` as in the pilot). The
paper's defaults appear once per set (``pooling_content_adaptive`` = ``wtc_paper`` = ``patch10``): each set
trains its own run so that a set stands alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from llava_uhd.bench.pilot import (
    CONFIGS,
    add_shared_arguments,
    chance,
    evaluate,
    image_tokens,
    input_size,
    learned_at,
    loss_curve,
    markdown_cell,
    pilot_configs,
    plot_losses,
    prepare,
    train,
)
from llava_uhd.vision.report import encoder_flops

SETS: dict[str, tuple[str, ...]] = {
    "pooling": ("pooling_avg", "pooling_content_adaptive", "pooling_pixel_unshuffle"),
    "placement": ("wtc_early", "wtc_paper", "wtc_late"),
    "patch": ("patch14", "patch12", "patch10", "patch8"),
}


def ablation_configs(name: str) -> list[Path]:
    """The pilot's PVC arm plus the ablation overlay."""
    return [*pilot_configs("pvc"), CONFIGS / "ablations" / f"{name}.yaml"]


def cost(model, side: int) -> dict:
    """Encoder settings, input size, visual tokens and encoder FLOPs (meta device) at a ``side`` px square."""
    cfg = model.encoder.cfg
    height, width = input_size(model, side)
    kwargs = {"patch_size": cfg.patch_size, "wtc_layers": tuple(cfg.wtc_layers), "wtc_pooling": cfg.wtc_pooling}
    flops = encoder_flops(model.config.encoder, int(height), int(width), **kwargs)
    return {"pooling": cfg.wtc_pooling, "wtc_layers": "-".join(map(str, cfg.wtc_layers)), "patch": cfg.patch_size,
            "input": f"{height}x{width}", "image_tokens": image_tokens(model, side), "encoder_gflops": flops / 1e9}


def plot(rows: list[dict], title: str, path: Path, chance: float) -> None:
    """Accuracy vs encoder GFLOPs, one colour per set, each point named."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    for index, name in enumerate(dict.fromkeys(r["set"] for r in rows)):
        points = [r for r in rows if r["set"] == name]
        ax.scatter([r["encoder_gflops"] for r in points], [r["accuracy"] for r in points], label=name,
                   color=f"C{index}", s=40)
        for r in points:
            ax.annotate(r["config"], (r["encoder_gflops"], r["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    ax.set_xlabel("encoder GFLOPs per image (meta device)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_ylim(0, 1.08)  # room for the labels of points at 1.0
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_outputs(out: Path, stem: str, rows: list[dict], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({**info, "results": rows}, indent=1))
    keys = ["set", "config", "pooling", "wtc_layers", "patch", "input", "image_tokens", "encoder_gflops", "train_s",
            "learned_at_step", "accuracy"]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(markdown_cell(row[k]) for k in keys) + " |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, f"PVC ablations ({stem.removeprefix('ablate_')}), ShapeGrid {info['data']['grid']}x"
               f"{info['data']['grid']} '{info['data']['question']}', {info['steps']} steps", out / f"{stem}.png",
         info["chance"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", choices=[*SETS, "all"], default="pooling", dest="ablation")
    parser.add_argument("--steps", type=int, default=300, help="training steps per config")
    parser.add_argument("--out", default="docs/ablations")
    parser.add_argument("--runs", default="runs/ablations")
    add_shared_arguments(parser)


def run(args: argparse.Namespace) -> int:
    spec, data = prepare(args)
    names = [(s, n) for s in (SETS if args.ablation == "all" else [args.ablation]) for n in SETS[s]]
    rows, curves, started = [], {}, time.perf_counter()
    for set_name, name in names:
        model, train_s, run_dir = train(ablation_configs(name), name, data, Path(args.runs), args.steps,
                                        args.tokenizer, args.fit_arg, args.reuse, spec)
        metric, split, _ = evaluate(model, spec, name)
        values = metric.compute()
        curves[name] = loss_curve(run_dir)
        rows.append({"set": set_name, "config": name, **cost(model, spec.min_side), "steps": args.steps,
                     "train_s": round(train_s, 1), "learned_at_step": learned_at(curves[name]),
                     "accuracy": float(values["accuracy"]),
                     "questions": int(values["count"]), "run": str(run_dir)})
        print(f"ablate {name}: accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['encoder_gflops']:.3f} GFLOPs, "
              f"train {train_s:.0f} s", file=sys.stderr)
    info = {"command": "python -m llava_uhd.bench ablate " + " ".join(sys.argv[2:]), "steps": args.steps,
            "data": asdict(spec), "chance": chance(spec), "total_s": round(time.perf_counter() - started, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    write_outputs(Path(args.out), f"ablate_{args.ablation}", rows, info)
    plot_losses(curves, {}, f"PVC ablations ({args.ablation}): training loss, ShapeGrid {spec.grid}x{spec.grid} "
                f"'{spec.question}'", Path(args.out) / f"ablate_{args.ablation}_loss.png")
    print((Path(args.out) / f"ablate_{args.ablation}.md").read_text())
    return 0
