"""Encoder speed and roofline: ViT-UHD against the GNE baseline and against the machine's GEMM rate.

``python -m llava_uhd.bench roofline`` builds both SO400M-shaped encoders with random weights (batch 1),
resizes a 768^2 request with each encoder's resolution policy, counts FLOPs on the meta device, then times
forwards *alternately* (UHD, GNE, a large GEMM, UHD, GNE, GEMM, ...) after a warm-up so that all see the same
machine state. It reports the FLOP ratio, the wall-clock speed-up and their quotient (the requirement:
speed-up >= 0.9 x FLOP ratio) and the roofline: each encoder's achieved FLOP/s as a share of the GEMM's (fp32
on CPU, bf16 on GPU), whole and per part (patch embed, attention, MLP, WTC; parts timed by forward hooks in
the same rounds). Writes ``vision_bench.{csv,json,png}`` and ``roofline.{csv,png}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

from llava_uhd.bench.options import PAIRS, add_encoder_options, checked_run
from llava_uhd.bench.report import write_csv
from llava_uhd.profiling import elapsed_ms, mark, median_ms, pick_device, time_ms
from llava_uhd.vision.report import policy_for

TIMED_PARTS = ("patch_embed", "attention", "mlp", "wtc")
"""Encoder parts timed and counted separately; everything else (norms, residual adds, pos-embed, token reorder)
is reported as ``other``."""


def timed_part_of(module_name: str) -> str | None:
    """The part a (dotted) module name belongs to, or None for a container or a leaf outside every part."""
    parts = module_name.split(".")
    if parts[:2] == ["patch_embed", "proj"] and len(parts) == 2:
        return "patch_embed"
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("attn", "mlp"):
        return "attention" if parts[2] == "attn" else "mlp"
    if len(parts) == 2 and parts[0] == "wtc":
        return "wtc"
    return None


def part_flops(name: str, sizes: list[tuple[int, int]], dense: bool = True, attn_impl: str = "sdpa",
               **model_kwargs: Any) -> dict[str, int]:
    """FLOPs per part (and ``total``) of one forward of images ``sizes``, counted on the meta device.

    ``dense``: one [1, 3, H, W] forward per image (summed); otherwise one packed forward of the list, with the
    packed attention kernel ``attn_impl`` (``block_diagonal`` counts its pack-wide attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(name, device="meta", **model_kwargs).eval()
    model.attn_impl = attn_impl  # on the meta device SDPA decomposes into counted matmuls
    inputs = [torch.empty(1, 3, h, w, device="meta") for h, w in sizes] if dense else [
        [torch.empty(3, h, w, device="meta") for h, w in sizes]]
    out = dict.fromkeys((*TIMED_PARTS, "total"), 0)
    for x in inputs:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        prefix = type(model).__name__ + "."
        for module, ops in counter.get_flop_counts().items():
            part = timed_part_of(module.removeprefix(prefix)) if module.startswith(prefix) else None
            if part is not None:
                out[part] += sum(ops.values())
        out["total"] += int(counter.get_total_flops())
    out["other"] = out["total"] - sum(out[p] for p in TIMED_PARTS)
    return out


class PartTimer:
    """Forward hooks that add up the wall time spent in each part (``TIMED_PARTS``) while enabled.

    CUDA: a pair of events per call, read once at the end (no synchronisation inside the forward); CPU: the
    clock between the pre-hook and the hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ms = dict.fromkeys(TIMED_PARTS, 0.0)
        self._pending: list[tuple[str, Any, Any]] = []
        self._handles = []
        self._open: dict[int, Any] = {}
        for module_name, module in model.named_modules():
            part = timed_part_of(module_name)
            if part is not None:
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(partial(self._stop, part)))

    @staticmethod
    def _now(module: torch.nn.Module) -> Any:
        """A ``profiling.mark`` on the device of the module's weights."""
        param = next(module.parameters(), None)
        return mark(param.device if param is not None else "cpu")

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._open[id(module)] = self._now(module)

    def _stop(self, part: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._pending.append((part, self._open.pop(id(module)), self._now(module)))

    def collect(self) -> dict[str, float]:
        """Add the pending intervals to ``ms`` (synchronising CUDA once) and return ``ms``."""
        if any(not isinstance(start, float) for _, start, _ in self._pending):
            torch.cuda.synchronize()
        for part, start, stop in self._pending:
            self.ms[part] += elapsed_ms(start, stop)
        self._pending.clear()
        return self.ms

    def take(self) -> dict[str, float]:
        """The ms per part since the last ``take`` (collected), and start again from zero."""
        ms = dict(self.collect())
        self.ms = dict.fromkeys(TIMED_PARTS, 0.0)
        return ms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def gemm_rate(device: str | torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of an ``n x n x n`` matmul (median of ``repeats`` after one warm-up): the machine's practical
    limit the encoder is held against. Default ``n``: 2048 on CPU, 8192 on CUDA."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return 2 * n**3 / (ms / 1e3)


def roofline_rows(name: str, flops: dict[str, int], whole_ms: float, parts_ms: dict[str, float],
                  rate: float) -> list[dict]:
    """Achieved FLOP/s and share of the GEMM rate, whole encoder and per part (medians over the same rounds);
    ``other`` is the time outside every part (norms, residual adds, pos-embed, token reorder)."""
    rows = [{"model": name, "part": "encoder", "gflop": flops["total"] / 1e9, "ms": whole_ms}]
    for part in TIMED_PARTS:
        rows.append({"model": name, "part": part, "gflop": flops[part] / 1e9, "ms": parts_ms[part]})
    rows.append({"model": name, "part": "other", "gflop": flops["other"] / 1e9,
                 "ms": max(whole_ms - sum(parts_ms.values()), 0.0)})
    for row in rows:
        row["gflops_per_s"] = row["gflop"] / (row["ms"] / 1e3) if row["ms"] > 0 else 0.0
        row["share_of_gemm"] = row["gflops_per_s"] * 1e9 / rate
        row["time_share"] = row["ms"] / whole_ms
    return rows


def measure(shape: str, resolution: int, repeats: int, warmup: int, device: str, seed: int = 0,
            dtype: str | None = None, gemm_repeats: int = 3) -> dict:
    """Time the shape's ViT-UHD / GNE pair and the GEMM in alternating rounds; FLOPs, ratios and roofline."""
    dev, torch_dtype = pick_device(device, dtype)
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
        parts_ms = {p: statistics.median(r[p] for r in parts[name]) for p in TIMED_PARTS}
        roofline += roofline_rows(name, row["part_flops"], row["median_ms"], parts_ms, rate)
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


def write(result: dict, out: Path) -> list[Path]:
    """``vision_bench.{json,csv,png}`` (the pair) and ``roofline.{csv,png}`` (the shares per part) in ``out``."""
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / n for n in ("vision_bench.json", "vision_bench.csv", "vision_bench.png", "roofline.csv",
                               "roofline.png")]
    paths[0].write_text(json.dumps(result, indent=2))
    write_csv(paths[1], result["rows"], ["model", "input_size", "output_tokens", "tflops", "median_ms"], digits=4)
    write_csv(paths[3], result["roofline"], ["model", "part", "gflop", "ms", "gflops_per_s", "share_of_gemm",
                                             "time_share"], digits=4)
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
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

    fig = Figure(figsize=(8, 3.4))
    ax = fig.subplots()
    parts = ["encoder", *TIMED_PARTS, "other"]
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
    return paths


def show(result: dict) -> None:
    """The pair, the FLOP / wall-clock ratios and the roofline table, as printed lines."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_encoder_options(parser)
    parser.add_argument("--resolution", type=int, default=768, help="square request side, before the policy")


def run(args: argparse.Namespace) -> int:
    checked_run(args, lambda: measure(args.shape, args.resolution, args.repeats, args.warmup, args.device,
                                      dtype=args.dtype), write, show)
    return 0
