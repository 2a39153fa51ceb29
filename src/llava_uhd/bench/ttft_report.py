"""What ``bench ttft`` writes and prints: the rows as markdown tables, CSV, JSON and a plot of TTFT and visual
tokens against the requested resolution, and the summary lines (the paper's figures beside the measured ones
on CUDA; the FLOP reproduction and the release setting for the modeled full-size shape)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava_uhd.bench.report import markdown_table, write_csv
from llava_uhd.bench.ttft_models import BY_KEY, ENCODERS

CSV_FIELDS = [
    "shape", "encoder", "label", "request", "height", "width", "visual_tokens", "prompt_tokens",
    "encoder_flops", "projector_flops", "prefill_flops", "ttft_flops", "modeled_ttft_ms",
    "encoder_ms", "prefill_ms", "ttft_ms", "ttft_min_ms", "peak_mem_mb",
]
PAPER_TTFT_MS = {"uhd": {512: 55, 768: 77, 1024: 121}, "gne": {512: 61, 768: 147, 1024: 297}}
"""The paper's TTFT plot with Qwen2-7B (read off the figure): ViT-UHD (16x) and MoonViT (GNE + 2x2 merger)."""
PAPER_FULL_MODEL_MS = {"LLaVA-UHD v3": 153.8, "Qwen2-VL-7B": 301.8}


@dataclass
class Row:
    """One (shape, encoder, resolution) measurement."""

    shape: str
    encoder: str
    label: str
    request: int
    height: int
    width: int
    visual_tokens: int
    prompt_tokens: int
    encoder_flops: int
    """ViT forward only (what the paper's 7.92 TFLOP refers to)."""
    projector_flops: int
    prefill_flops: int
    ttft_flops: int = 0
    modeled_ttft_ms: float | None = None
    encoder_ms: float | None = None
    """Median ms of encoder + projector + splice into the prompt embeddings."""
    prefill_ms: float | None = None
    ttft_ms: float | None = None
    """Median of the per-round sums encoder + prefill."""
    ttft_min_ms: float | None = None
    """Fastest round: on a machine shared with other jobs, the least disturbed measurement."""
    peak_mem_mb: float | None = None
    times_ms: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ttft_flops = self.encoder_flops + self.projector_flops + self.prefill_flops


def format_table(rows: list[Row]) -> str:
    """One line per (encoder, resolution): tokens, FLOPs per part and, when timed, ms and peak memory."""
    timed = any(r.ttft_ms is not None for r in rows)
    unit, scale = ("GFLOP", 1e9) if rows and rows[0].shape == "tiny" else ("TFLOP", 1e12)
    header = ["encoder", "request", "input", "tokens", f"enc {unit}", f"proj {unit}", f"prefill {unit}",
              f"TTFT {unit}"]
    header += ["enc ms", "prefill ms", "TTFT ms", "TTFT min ms", "peak MiB"] if timed else ["modeled TTFT ms"]
    cells = []
    for r in rows:
        line = [r.label, f"{r.request}^2", f"{r.height}x{r.width}", str(r.visual_tokens)]
        line += [f"{v / scale:.3f}" for v in (r.encoder_flops, r.projector_flops, r.prefill_flops, r.ttft_flops)]
        if timed:
            line += [f"{v:.1f}" for v in (r.encoder_ms, r.prefill_ms, r.ttft_ms, r.ttft_min_ms)]
            line.append(f"{r.peak_mem_mb:.0f}")
        else:
            line.append(f"{r.modeled_ttft_ms:.1f}")
        cells.append(line)
    return markdown_table(header, cells)


def format_ratios(entries: list[dict]) -> str:
    """GNE over each encoder: the FLOP ratio and, when timed, the wall-clock ratios."""
    timed = any("wall_ratio" in e for e in entries)
    header = ["GNE / encoder", "request", "TTFT FLOP ratio"]
    header += ["wall-clock ratio (median)", "wall / FLOP", "wall-clock ratio (fastest round)"] if timed else []
    cells = []
    for e in entries:
        line = [BY_KEY[e["encoder"]].label, f"{e['request']}^2", f"{e['flop_ratio']:.2f}x"]
        if timed:
            line += [f"{e['wall_ratio']:.2f}x", f"{e['wall_over_flop']:.2f}", f"{e['wall_ratio_min']:.2f}x"]
        cells.append(line)
    return markdown_table(header, cells)


def plot(rows: list[Row], path: Path, title: str) -> None:
    """TTFT (measured, or modeled from FLOPs) and visual tokens against the requested resolution."""
    from matplotlib.figure import Figure

    timed = any(r.ttft_ms is not None for r in rows)
    fig = Figure(figsize=(10, 4))
    ax_ttft, ax_tokens = fig.subplots(1, 2)
    for kind in ENCODERS:
        mine = [r for r in rows if r.encoder == kind.key]
        if not mine:
            continue
        x = [r.request for r in mine]
        ax_ttft.plot(x, [r.ttft_ms if timed else r.modeled_ttft_ms for r in mine], marker="o", label=kind.label)
        ax_tokens.plot(x, [r.visual_tokens for r in mine], marker="o", label=kind.label)
    ax_ttft.set_ylabel("TTFT ms (median, measured)" if timed else "TTFT ms (modeled from FLOPs)")
    ax_tokens.set_ylabel("visual tokens in the LLM prompt")
    for ax in (ax_ttft, ax_tokens):
        ax.set_xlabel("requested resolution (square side, px)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax_tokens.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(result: dict, rows: list[Row], out: Path) -> list[Path]:
    """``ttft_<shape><suffix>.{csv,json,png}`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ttft_{result['shape']}{result.get('suffix', '')}"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".png")]
    write_csv(paths[0], [asdict(row) for row in rows], CSV_FIELDS, digits=3)
    paths[1].write_text(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, paths[2], result["title"])
    return paths


def paper_lines(rows: list[Row]) -> list[str]:
    """Measured TTFT beside the paper's (Qwen2-7B), where the paper has a figure for the row."""
    lines = []
    for row in rows:
        paper = PAPER_TTFT_MS.get(row.encoder, {}).get(row.request)
        if paper is not None and row.ttft_ms is not None:
            lines.append(f"  {row.label:24s} {row.request}^2: measured {row.ttft_ms:7.1f} ms, paper ~{paper} ms")
    return lines


def print_summary(result: dict, rows: list[Row], timed: bool, tflops: float, paths: list[Path]) -> None:
    """The printed report of one table (``result``: what ``write`` wrote as JSON)."""
    print(result["title"])
    print(f"prompt: {result['text_tokens']} text tokens + the visual tokens; FLOPs: {result['flops']}")
    if timed:
        print(f"peak memory: {result['memory']}; timing: {result['timing']}")
    print(format_table(rows))
    print("\nTTFT ratios, GNE over each encoder (wall-clock from the same alternating run):")
    print(format_ratios(result["ratios"]))
    if timed and result["shape"] == "so400m-qwen2-7b":
        print("\nBeside the paper (its TTFT plot, Qwen2-7B; MoonViT = GNE + merger):")
        print("\n".join(paper_lines(rows)) or "  (no request at 512 / 768 / 1024)")
        print("  full models in the paper: " + ", ".join(f"{k} {v} ms" for k, v in PAPER_FULL_MODEL_MS.items()))
    if not timed:
        c = result["checks"]
        print(f"\nFLOP reproduction: GNE SO400M/14 encoder at 1022^2 ({c['gne_encoder_tokens_1022']} tokens) = "
              f"{c['gne_encoder_tflop_1022']:.2f} TFLOP (paper: 7.92); ViT-UHD at "
              f"{c['uhd_encoder_size_for_1022'][0]}^2 (its policy for a 1022 request) = "
              f"{c['uhd_encoder_tflop_same_size']:.2f} TFLOP")
        print(f"1024^2 request, TTFT FLOPs: GNE {c['gne_ttft_tflop_1024']:.2f} TFLOP vs ViT-UHD + merger "
              f"{c['uhd_merger_ttft_tflop_1024']:.2f} TFLOP -> {c['ttft_flop_ratio_1024']:.2f}x lower "
              f"(>= 3x: {'yes' if c['ttft_flop_ratio_1024'] >= 3 else 'NO'}); modeled at {tflops:g} TFLOP/s: "
              f"{c['modeled_ttft_ms_1024']['gne']:.0f} ms vs {c['modeled_ttft_ms_1024']['uhd_merger']:.0f} ms")
        r = result["release_setting"]
        print("\nRelease setting at 1024^2 (MoonViT ViT-UHD + mlp vs MoonViT GNE + merger; paper: 1.9x):")
        for policy_name in ("default", "release"):
            e = r[policy_name]
            print(f"  {policy_name} resize rule: GNE + merger {e['gne_merger']['input'][0]}^2, "
                  f"{e['gne_merger']['llm_tokens']} tokens, {e['gne_merger']['ttft_tflop']:.2f} TFLOP; ViT-UHD + mlp "
                  f"{e['uhd_mlp']['input'][0]}^2, {e['uhd_mlp']['llm_tokens']} tokens, "
                  f"{e['uhd_mlp']['ttft_tflop']:.2f} TFLOP -> {e['ttft_flop_ratio']:.2f}x")
    print("written: " + ", ".join(str(p) for p in paths))

