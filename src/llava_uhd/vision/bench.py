"""Encoder speed benchmark: ViT-UHD against the global native-resolution baseline (GNE), side by side.

``python -m llava_uhd.vision.bench`` builds both SO400M-shaped encoders with random weights (fp32, CPU,
batch 1), resizes a 768^2 request with each encoder's resolution policy, counts FLOPs on the meta device,
then times forwards *alternately* (UHD, GNE, UHD, GNE, ...) after a warm-up so that both see the same
machine state. It reports the FLOP ratio, the wall-clock speed-up and their quotient (the requirement:
speed-up >= 0.9 x FLOP ratio), and writes CSV + JSON + a PNG bar chart.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from ..profiling import time_ms
from . import vit_uhd  # noqa: F401  (registers the models)
from .report import encoder_flops, policy_for

PAIRS = {
    "so400m": ("vit_uhd_so400m_patch10_siglip", "vit_gne_so400m_patch14_siglip"),
    "tiny": ("vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_siglip"),
}


def run(shape: str, resolution: int, repeats: int, warmup: int, device: str, seed: int = 0) -> dict:
    uhd_name, gne_name = PAIRS[shape]
    torch.manual_seed(seed)
    rows = {}
    inputs = {}
    models = {}
    for name in (uhd_name, gne_name):
        model = timm.create_model(name).to(device).eval()
        size = policy_for(model).target_size(resolution, resolution)
        models[name] = model
        inputs[name] = torch.randn(1, 3, *size, device=device)
        rows[name] = {
            "model": name,
            "input_size": f"{size[0]}x{size[1]}",
            "output_tokens": model.num_tokens(*size),
            "tflops": encoder_flops(name, *size) / 1e12,
            "times_ms": [],
        }
    with torch.inference_mode():
        for _ in tqdm(range(warmup), desc="warm-up", leave=False):
            for name, model in models.items():
                model(inputs[name])
        for _ in tqdm(range(repeats), desc="timed rounds (UHD, GNE alternating)"):
            for name, model in models.items():
                rows[name]["times_ms"].append(time_ms(lambda m=model, x=inputs[name]: m(x), device))
    for row in rows.values():
        row["median_ms"] = statistics.median(row["times_ms"])
    uhd, gne = rows[uhd_name], rows[gne_name]
    flop_ratio = gne["tflops"] / uhd["tflops"]
    speedup = gne["median_ms"] / uhd["median_ms"]
    return {
        "shape": shape,
        "resolution": resolution,
        "device": device,
        "threads": torch.get_num_threads(),
        "rows": list(rows.values()),
        "flop_ratio": flop_ratio,
        "wall_speedup": speedup,
        "efficiency": speedup / flop_ratio,
        "meets_0.9x": speedup >= 0.9 * flop_ratio,
    }


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_bench.json").write_text(json.dumps(result, indent=2))
    with open(out / "vision_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "input_size", "output_tokens", "tflops", "median_ms"])
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["model"].replace("_siglip", "") for r in result["rows"]]
    axes[0].bar(names, [r["tflops"] for r in result["rows"]], color=["tab:green", "tab:gray"])
    axes[0].set_ylabel("TFLOP / image")
    axes[1].bar(names, [r["median_ms"] for r in result["rows"]], color=["tab:green", "tab:gray"])
    axes[1].set_ylabel(f"median ms ({result['device']})")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"{result['shape']} @ {result['resolution']}px: FLOP ratio {result['flop_ratio']:.2f}x, "
        f"wall speed-up {result['wall_speedup']:.2f}x"
    )
    fig.tight_layout()
    fig.savefig(out / "vision_bench.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.vision.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(PAIRS), default="so400m")
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    result = run(args.shape, args.resolution, args.repeats, args.warmup, args.device)
    write(result, args.out)
    print(f"\n{'model':34s} {'input':>10s} {'tokens':>7s} {'TFLOP':>8s} {'median ms':>10s}")
    for row in result["rows"]:
        print(
            f"{row['model']:34s} {row['input_size']:>10s} {row['output_tokens']:7d} "
            f"{row['tflops']:8.3f} {row['median_ms']:10.1f}"
        )
    print(
        f"\nFLOP ratio (GNE/UHD): {result['flop_ratio']:.2f}x   wall-clock speed-up: {result['wall_speedup']:.2f}x   "
        f"speed-up / FLOP ratio: {result['efficiency']:.2f} (requirement >= 0.90: "
        f"{'met' if result['meets_0.9x'] else 'NOT met'})"
    )
    print(f"written: {args.out}/vision_bench.csv, .json, .png")
    return result


if __name__ == "__main__":
    main()
