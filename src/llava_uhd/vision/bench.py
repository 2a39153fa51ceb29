"""Encoder speed benchmarks: ViT-UHD against the GNE baseline, against the machine's GEMM rate, and packing.

``python -m llava_uhd.vision.bench`` builds both SO400M-shaped encoders with random weights (batch 1), resizes
a 768^2 request with each encoder's resolution policy, counts FLOPs on the meta device, then times forwards
*alternately* (UHD, GNE, a large GEMM, UHD, GNE, GEMM, ...) after a warm-up so that all see the same machine
state. It reports the FLOP ratio, the wall-clock speed-up and their quotient (the requirement: speed-up >= 0.9 x
FLOP ratio) and the roofline: each encoder's achieved FLOP/s as a share of the GEMM's (fp32 on CPU, bf16 on
GPU), whole and per part (patch embed, attention, MLP, WTC; parts timed by forward hooks in the same rounds).
Writes ``vision_bench.{csv,json,png}`` and ``roofline.{csv,png}``.

``python -m llava_uhd.vision.bench --pack`` encodes the same mixed-size images (a) one by one, (b) packed
(``attn_impl`` auto: per-image SDPA, or varlen on a GPU) and (c) packed with one block-diagonal mask over the
pack, alternating in each round, and reports medians, ratios and tokens/s (``pack_bench.{csv,json,png}``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from ..profiling import time_ms
from . import vit_uhd  # noqa: F401  (registers the models)
from .report import PARTS, PartTimer, gemm_rate, part_flops, policy_for

PAIRS = {
    "so400m": ("vit_uhd_so400m_patch10_siglip", "vit_gne_so400m_patch14_siglip"),
    "tiny": ("vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_siglip"),
}
PACK_SIZES = ((400, 600), (600, 400), (480, 480))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _setup(device: str, dtype: str | None, threads: int | None) -> tuple[torch.device, torch.dtype]:
    """Device and dtype (default: fp32 on CPU, bf16 on CUDA); a CUDA request without a GPU is an error."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    if threads:
        torch.set_num_threads(threads)
    return dev, DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]


def _roofline_rows(name: str, flops: dict[str, int], whole_ms: float, parts_ms: dict[str, float],
                   rate: float) -> list[dict]:
    """Achieved FLOP/s and share of the GEMM rate, whole encoder and per part (medians over the same rounds);
    ``other`` is the time outside every part (norms, residual adds, pos-embed, token reorder)."""
    rows = [{"model": name, "part": "encoder", "gflop": flops["total"] / 1e9, "ms": whole_ms}]
    for part in PARTS:
        rows.append({"model": name, "part": part, "gflop": flops[part] / 1e9, "ms": parts_ms[part]})
    rows.append({"model": name, "part": "other", "gflop": flops["other"] / 1e9,
                 "ms": max(whole_ms - sum(parts_ms.values()), 0.0)})
    for row in rows:
        row["gflops_per_s"] = row["gflop"] / (row["ms"] / 1e3) if row["ms"] > 0 else 0.0
        row["share_of_gemm"] = row["gflops_per_s"] * 1e9 / rate
        row["time_share"] = row["ms"] / whole_ms
    return rows


def run(shape: str, resolution: int, repeats: int, warmup: int, device: str, seed: int = 0,
        dtype: str | None = None, threads: int | None = None, gemm_repeats: int = 3) -> dict:
    dev, torch_dtype = _setup(device, dtype, threads)
    uhd_name, gne_name = PAIRS[shape]
    torch.manual_seed(seed)
    rows, inputs, models, timers = {}, {}, {}, {}
    for name in (uhd_name, gne_name):
        model = timm.create_model(name).to(dev, torch_dtype).eval()
        size = policy_for(model).target_size(resolution, resolution)
        models[name] = model
        inputs[name] = torch.randn(1, 3, *size, device=dev, dtype=torch_dtype)
        flops = part_flops(name, [size])
        rows[name] = {"model": name, "input_size": f"{size[0]}x{size[1]}", "output_tokens": model.num_tokens(*size),
                      "tflops": flops["total"] / 1e12, "part_flops": flops, "times_ms": []}
    gemm = []
    parts: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for name, model in models.items():
        timers[name] = PartTimer(model)  # a few clock reads (CPU) or event records (CUDA) per part call
    with torch.inference_mode():
        for _ in tqdm(range(warmup), desc="warm-up", leave=False):
            for name, model in models.items():
                model(inputs[name])
                timers[name].take()
        for _ in tqdm(range(repeats), desc="timed rounds (UHD, GNE, GEMM alternating)"):
            for name, model in models.items():
                rows[name]["times_ms"].append(time_ms(lambda m=model, x=inputs[name]: m(x), dev))
                parts[name].append(timers[name].take())
            gemm.append(gemm_rate(dev, torch_dtype, repeats=gemm_repeats))
    rate = statistics.median(gemm)
    roofline = []
    for name, row in rows.items():
        timers[name].remove()
        row["median_ms"] = statistics.median(row["times_ms"])
        parts_ms = {p: statistics.median(r[p] for r in parts[name]) for p in PARTS}
        roofline += _roofline_rows(name, row["part_flops"], row["median_ms"], parts_ms, rate)
    uhd, gne = rows[uhd_name], rows[gne_name]
    flop_ratio = gne["tflops"] / uhd["tflops"]
    speedup = gne["median_ms"] / uhd["median_ms"]
    return {
        "shape": shape,
        "resolution": resolution,
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "rows": list(rows.values()),
        "flop_ratio": flop_ratio,
        "wall_speedup": speedup,
        "efficiency": speedup / flop_ratio,
        "meets_0.9x": speedup >= 0.9 * flop_ratio,
        "gemm_gflops_per_s": rate / 1e9,
        "gemm_rounds_gflops_per_s": [g / 1e9 for g in gemm],
        "roofline": roofline,
    }


def run_pack(model_name: str, sizes: list[tuple[int, int]], repeats: int, warmup: int, device: str, seed: int = 0,
             dtype: str | None = None, threads: int | None = None) -> dict:
    """(a) one by one, (b) packed, (c) packed with a block-diagonal mask, alternating; medians and ratios."""
    dev, torch_dtype = _setup(device, dtype, threads)
    torch.manual_seed(seed)
    model = timm.create_model(model_name).to(dev, torch_dtype).eval()
    for h, w in sizes:
        model.stage_grids(h, w)  # one clear error for a size the encoder cannot take
    images = [torch.randn(3, h, w, device=dev, dtype=torch_dtype) for h, w in sizes]
    impl = model.attn_impl

    def one_by_one():
        return [model(img[None]) for img in images]

    def packed(kind: str):
        def call():
            model.attn_impl = kind
            try:
                return model(images)
            finally:
                model.attn_impl = impl
        return call

    modes = {"one_by_one": one_by_one, "packed": packed(impl), "block_diagonal": packed("block_diagonal")}
    times: dict[str, list[float]] = {k: [] for k in modes}
    with torch.inference_mode():
        ref, out = torch.cat([o.tokens[0] for o in one_by_one()]), modes["packed"]().tokens
        diff = (ref.float() - out.float()).abs().max().item()
        for _ in tqdm(range(warmup), desc="warm-up", leave=False):
            for fn in modes.values():
                fn()
        bar = tqdm(range(repeats), desc="rounds: one by one, packed, block-diagonal")
        for round_ in bar:
            order = list(modes)[round_ % 3:] + list(modes)[: round_ % 3]  # rotate who goes first
            for key in order:
                times[key].append(time_ms(modes[key], dev))
            bar.set_postfix({k: f"{statistics.median(v) / 1e3:.1f}s" for k, v in times.items()})
    patch_tokens = sum((h // model.patch_size) * (w // model.patch_size) for h, w in sizes)
    out_tokens = sum(model.num_tokens(h, w) for h, w in sizes)
    rows = []
    for key, values in times.items():
        ms = statistics.median(values)
        rows.append({"mode": key, "median_ms": ms, "min_ms": min(values), "patch_tokens_per_s": patch_tokens / ms * 1e3,
                     "output_tokens_per_s": out_tokens / ms * 1e3, "times_ms": values})
    by = {r["mode"]: r["median_ms"] for r in rows}
    return {
        "model": model_name,
        "sizes": [f"{h}x{w}" for h, w in sizes],
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "attn_impl": impl,
        "packed_kernel": "varlen" if impl in ("auto", "varlen") and dev.type == "cuda"
        and torch_dtype != torch.float32 else "sdpa",
        "repeats": repeats,
        "patch_tokens": patch_tokens,
        "output_tokens": out_tokens,
        "rows": rows,
        "packed_over_one_by_one": by["packed"] / by["one_by_one"],
        "block_diagonal_over_packed": by["block_diagonal"] / by["packed"],
        "packed_vs_one_by_one_max_abs_diff": diff,
        "meets_within_5pct": by["packed"] <= 1.05 * by["one_by_one"],
        "meets_1.5x_over_block_diagonal": by["block_diagonal"] >= 1.5 * by["packed"],
    }


# -- output ---------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in fields})


def write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / n for n in ("vision_bench.json", "vision_bench.csv", "vision_bench.png", "roofline.csv",
                               "roofline.png")]
    paths[0].write_text(json.dumps(result, indent=2))
    _write_csv(paths[1], result["rows"], ["model", "input_size", "output_tokens", "tflops", "median_ms"])
    _write_csv(paths[3], result["roofline"], ["model", "part", "gflop", "ms", "gflops_per_s", "share_of_gemm",
                                              "time_share"])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["model"].replace("_siglip", "") for r in result["rows"]]
    axes[0].bar(names, [r["tflops"] for r in result["rows"]], color=["tab:green", "tab:gray"])
    axes[0].set_ylabel("TFLOP / image")
    axes[1].bar(names, [r["median_ms"] for r in result["rows"]], color=["tab:green", "tab:gray"])
    axes[1].set_ylabel(f"median ms ({result['device']})")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{result['shape']} @ {result['resolution']}px: FLOP ratio {result['flop_ratio']:.2f}x, "
                 f"wall speed-up {result['wall_speedup']:.2f}x")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.4))
    parts = ["encoder", *PARTS, "other"]
    width = 0.8 / len(result["rows"])
    for i, row in enumerate(result["rows"]):
        mine = {r["part"]: r for r in result["roofline"] if r["model"] == row["model"]}
        xs = [j + i * width for j in range(len(parts))]
        ax.bar(xs, [100 * mine[p]["share_of_gemm"] for p in parts], width, label=row["model"])
    ax.axhline(100, color="black", lw=0.8)
    ax.axhline(75, color="tab:red", lw=0.8, ls="--", label="75% target (whole encoder)")
    ax.set_xticks([j + width * (len(result["rows"]) - 1) / 2 for j in range(len(parts))], parts)
    ax.set_ylabel("% of GEMM FLOP/s")
    ax.set_title(f"achieved FLOP/s vs a {result['dtype']} GEMM ({result['gemm_gflops_per_s']:.0f} GFLOP/s), "
                 f"{result['device']}, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[4], dpi=120)
    plt.close(fig)
    return paths


def write_pack(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pack_bench.json", out / "pack_bench.csv", out / "pack_bench.png"]
    paths[0].write_text(json.dumps(result, indent=2))
    _write_csv(paths[1], result["rows"], ["mode", "median_ms", "min_ms", "patch_tokens_per_s", "output_tokens_per_s"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([r["mode"] for r in result["rows"]], [r["median_ms"] / 1e3 for r in result["rows"]],
           color=["tab:gray", "tab:green", "tab:orange"])
    ax.set_ylabel("median s per pack")
    ax.set_title(f"{result['model']}, {' + '.join(result['sizes'])}, {result['dtype']} {result['device']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH (e.g. 400x600)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def print_pack(result: dict) -> None:
    print(f"\n{result['model']} {result['dtype']} on {result['device']} ({result['threads']} threads), images "
          f"{', '.join(result['sizes'])}: {result['patch_tokens']} patch tokens, {result['output_tokens']} out")
    print(f"{'mode':16s} {'median ms':>10s} {'min ms':>10s} {'patch tok/s':>12s} {'out tok/s':>10s}")
    for r in result["rows"]:
        print(f"{r['mode']:16s} {r['median_ms']:10.1f} {r['min_ms']:10.1f} {r['patch_tokens_per_s']:12.0f} "
              f"{r['output_tokens_per_s']:10.1f}")
    print(f"packed / one-by-one: {result['packed_over_one_by_one']:.3f} (target <= 1.05: "
          f"{'met' if result['meets_within_5pct'] else 'NOT met'}); block-diagonal / packed: "
          f"{result['block_diagonal_over_packed']:.2f}x (target >= 1.5x: "
          f"{'met' if result['meets_1.5x_over_block_diagonal'] else 'NOT met'}); packed kernel "
          f"{result['packed_kernel']}; max |packed - one-by-one| {result['packed_vs_one_by_one_max_abs_diff']:.2e}")


def print_encoders(result: dict) -> None:
    print(f"\n{'model':34s} {'input':>10s} {'tokens':>7s} {'TFLOP':>8s} {'median ms':>10s}")
    for row in result["rows"]:
        print(f"{row['model']:34s} {row['input_size']:>10s} {row['output_tokens']:7d} "
              f"{row['tflops']:8.3f} {row['median_ms']:10.1f}")
    print(f"\nFLOP ratio (GNE/UHD): {result['flop_ratio']:.2f}x   wall-clock speed-up: {result['wall_speedup']:.2f}x   "
          f"speed-up / FLOP ratio: {result['efficiency']:.2f} (requirement >= 0.90: "
          f"{'met' if result['meets_0.9x'] else 'NOT met'})")
    print(f"\nroofline: {result['dtype']} {result['gemm_gflops_per_s']:.1f} GFLOP/s GEMM on {result['device']}, "
          f"{result['threads']} threads")
    print(f"{'model':34s} {'part':12s} {'GFLOP':>9s} {'ms':>9s} {'GFLOP/s':>9s} {'% GEMM':>7s} {'% time':>7s}")
    for r in result["roofline"]:
        print(f"{r['model']:34s} {r['part']:12s} {r['gflop']:9.1f} {r['ms']:9.1f} {r['gflops_per_s']:9.1f} "
              f"{100 * r['share_of_gemm']:7.1f} {100 * r['time_share']:7.1f}")
    whole = next(r for r in result["roofline"] if r["part"] == "encoder")
    print(f"{whole['model']}: whole encoder at {100 * whole['share_of_gemm']:.0f}% of the GEMM rate (target >= 75%: "
          f"{'met' if whole['share_of_gemm'] >= 0.75 else 'NOT met'})")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m llava_uhd.vision.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(PAIRS), default="so400m")
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--pack", action="store_true", help="packing benchmark: one by one vs packed vs mask")
    parser.add_argument("--sizes", type=_size, nargs="+", default=list(PACK_SIZES), help="--pack images, HxW")
    parser.add_argument("--model", default=None, help="--pack encoder (default: the --shape pair's ViT-UHD)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.resolution <= 0 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0, --resolution > 0")
    model = args.model or PAIRS[args.shape][0]
    if model not in timm.list_models("vit_uhd_*") + timm.list_models("vit_gne_*"):
        parser.error(f"--model: unknown encoder {model!r}; choose from {timm.list_models('vit_[ug]*')}")
    command = "python -m llava_uhd.vision.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    try:  # before minutes of timing: a results folder that cannot be made is one message now
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.exit(2, f"error: --out {args.out}: cannot create the results folder ({err.strerror})\n")
    try:
        if args.pack:
            result = run_pack(model, args.sizes, args.repeats, args.warmup, args.device, dtype=args.dtype,
                              threads=args.threads)
            result["command"] = command
            paths = write_pack(result, args.out)
            print_pack(result)
        else:
            result = run(args.shape, args.resolution, args.repeats, args.warmup, args.device, dtype=args.dtype,
                         threads=args.threads)
            result["command"] = command
            paths = write(result, args.out)
            print_encoders(result)
    except (ValueError, RuntimeError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print("written: " + ", ".join(str(p) for p in paths))
    return result


if __name__ == "__main__":
    main()
