"""Packing benchmark: the same mixed-size images encoded one by one, packed, and packed with one mask.

``python -m llava_uhd.bench pack`` encodes the same images (a) one by one, (b) packed (``attn_impl`` auto:
per-image SDPA, or varlen on a GPU) and (c) packed with one block-diagonal mask over the pack, alternating in
each round (rotating which goes first), and reports medians, ratios and tokens/s (``pack_bench.{csv,json,png}``).
Targets: (b) within 5% of (a), and (b) at least 1.5x faster than (c).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import timm
import torch
from tqdm import tqdm

from llava_uhd.bench.options import PAIRS, add_encoder_options, checked_run, encoder_names
from llava_uhd.bench.report import write_csv
from llava_uhd.bench.roofline import part_flops
from llava_uhd.profiling import pick_device, time_ms

PACK_SIZES = ((400, 600), (600, 400), (480, 480))


def measure(model_name: str, sizes: list[tuple[int, int]], repeats: int, warmup: int, device: str, seed: int = 0,
            dtype: str | None = None) -> dict:
    """(a) one by one, (b) packed, (c) packed with a block-diagonal mask, alternating; medians and ratios."""
    dev, torch_dtype = pick_device(device, dtype)
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
    # The work each mode does: a wall-clock ratio above the FLOP ratio means the masked call also runs slower
    # per FLOP; at equal rates (c) / (b) would equal it.
    flops = {"packed": part_flops(model_name, sizes, dense=False)["total"],
             "block_diagonal": part_flops(model_name, sizes, dense=False, attn_impl="block_diagonal")["total"]}
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
        "gflop": {k: v / 1e9 for k, v in flops.items()},
        "block_diagonal_over_packed_flops": flops["block_diagonal"] / flops["packed"],
        "packed_vs_one_by_one_max_abs_diff": diff,
        "meets_within_5pct": by["packed"] <= 1.05 * by["one_by_one"],
        "meets_1.5x_over_block_diagonal": by["block_diagonal"] >= 1.5 * by["packed"],
    }


def write(result: dict, out: Path) -> list[Path]:
    """``pack_bench.{json,csv,png}`` in ``out``."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pack_bench.json", out / "pack_bench.csv", out / "pack_bench.png"]
    paths[0].write_text(json.dumps(result, indent=2))
    write_csv(paths[1], result["rows"], ["mode", "median_ms", "min_ms", "patch_tokens_per_s", "output_tokens_per_s"],
              digits=4)
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.bar([r["mode"] for r in result["rows"]], [r["median_ms"] / 1e3 for r in result["rows"]],
           color=["tab:gray", "tab:green", "tab:orange"])
    ax.set_ylabel("median s per pack")
    ax.set_title(f"{result['model']}, {' + '.join(result['sizes'])}, {result['dtype']} {result['device']}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    return paths


def show(result: dict) -> None:
    """Per mode the median, fastest round and tokens/s; the two ratios against their targets."""
    print(f"\n{result['model']} {result['dtype']} on {result['device']} ({result['threads']} threads), images "
          f"{', '.join(result['sizes'])}: {result['patch_tokens']} patch tokens, {result['output_tokens']} out")
    print(f"{'mode':16s} {'median ms':>10s} {'min ms':>10s} {'patch tok/s':>12s} {'out tok/s':>10s}")
    for r in result["rows"]:
        print(f"{r['mode']:16s} {r['median_ms']:10.1f} {r['min_ms']:10.1f} {r['patch_tokens_per_s']:12.0f} "
              f"{r['output_tokens_per_s']:10.1f}")
    print(f"packed / one-by-one: {result['packed_over_one_by_one']:.3f} (target <= 1.05: "
          f"{'met' if result['meets_within_5pct'] else 'NOT met'}); block-diagonal / packed: "
          f"{result['block_diagonal_over_packed']:.2f}x (target >= 1.5x: "
          f"{'met' if result['meets_1.5x_over_block_diagonal'] else 'NOT met'}; FLOP ratio "
          f"{result['block_diagonal_over_packed_flops']:.2f}x); packed kernel "
          f"{result['packed_kernel']}; max |packed - one-by-one| {result['packed_vs_one_by_one_max_abs_diff']:.2e}")


def image_size(text: str) -> tuple[int, int]:
    """``--sizes`` item: ``HEIGHTxWIDTH`` with positive sides."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HEIGHTxWIDTH (e.g. 400x600)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_options(parser)
    parser.add_argument("--sizes", type=image_size, nargs="+", default=list(PACK_SIZES), help="images, HxW")
    parser.add_argument("--model", default=None, help="encoder (default: the --shape pair's ViT-UHD)")


def run(args: argparse.Namespace) -> int:
    model = args.model or PAIRS[args.shape][0]
    if model not in encoder_names():
        args.parser.error(f"--model: unknown encoder {model!r}; choose from {timm.list_models('vit_[ug]*')}")
    checked_run(args, lambda: measure(model, args.sizes, args.repeats, args.warmup, args.device, dtype=args.dtype),
                write, show)
    return 0
