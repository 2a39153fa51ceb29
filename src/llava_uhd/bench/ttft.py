"""Time to first token (TTFT): four vision encoders in front of the same LLM, across input resolutions.

``python -m llava_uhd.bench ttft --shape {so400m-qwen2-7b,tiny,base}`` compares, as in the paper's TTFT
figure: GNE (patch 14, no compression, 2x2 merger; MoonViT / Qwen2-VL style), SBE (336 px slices plus a
thumbnail, merger), ViT-UHD with the ``mlp`` projector (16x) and ViT-UHD with the ``merger`` (64x). Each
square request goes through the encoder's own resolution policy (``LlavaUHD.policy``). The LLM prompt is
the image's visual tokens plus a short ChatML text prompt.

Per encoder and resolution it reports the visual tokens, FLOPs (encoder, projector, LLM prefill: counted
with ``FlopCounterMode`` on the meta device, where attention decomposes into matmuls; the prefill keeps
only the last position's logits, as ``generate`` does) and, for the shapes run for real, wall-clock
encoder ms (encoder + projector + splice), prefill ms (LLM forward to the first token's logits), TTFT ms and
peak memory.

Shapes (all weights random):

- ``so400m-qwen2-7b``: SO400M encoders + a Qwen2-7B-shaped LLM. On CPU, counted on the meta device only; TTFT
  is *modeled* as total FLOPs / an assumed sustained throughput (``--tflops``, stated in every output). With
  ``--device cuda`` (``--dtype bfloat16``) it is timed for real with CUDA events, beside the paper's figures.
- ``tiny``: the tiny encoders + a tiny Qwen2 (width 64), timed.
- ``base``: a ViT-B-shaped encoder (width 768, depth 12, 12 heads; ViT-UHD: patch 10, WTC after blocks 2
  and 8, the SO400M placement 4 / 18 of 27 scaled to 12 blocks) + a Qwen2-0.5B-shaped LLM (hidden 896,
  24 layers, 14 heads, 2 KV heads, MLP 4864) whose vocabulary is cut to the tiny tokenizer's, timed.

Timed runs alternate between the encoders inside one process (rotating which goes first each round)
after a warm-up, and report the median of ``--repeats`` rounds, so every encoder sees the same machine
state; the printed wall-clock ratios therefore stand beside the FLOP ratios of the same rows.
``--family`` picks the ViTs (SigLIP-style, or MoonViT-style with 2-D RoPE: the ``vit_*_moonvit`` entries;
``both`` writes one set of files each) and ``--compile`` times every row eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm import tqdm

from llava_uhd.llm import load_llm, tiny_qwen2_config
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig, count_image_tokens, resolution_policy
from llava_uhd.profiling import count_flops, synchronize
from llava_uhd.projector import build_projector
from llava_uhd.vision.resize import ResolutionPolicy
from llava_uhd.vision.slicing import SliceEncoder
from llava_uhd.vision.vit_uhd import create_vit_uhd

SHAPES = ("so400m-qwen2-7b", "tiny", "base")
RESOLUTIONS = (512, 768, 1024, 1536, 2048)
PROMPT = "What is in the image? Answer briefly."
DEFAULT_TFLOPS = 125.0
"""Assumed sustained throughput for the modeled TTFT: about 40% of an A100's 312 TFLOP/s bf16 dense peak,
close to what the paper's TTFT plot implies for ~8-28 TFLOP of work."""


@dataclass(frozen=True)
class EncoderKind:
    key: str
    label: str
    vit: str
    """Which ViT: ``gne`` (patch 14, no WTC) or ``uhd`` (patch 10 + WTC)."""
    projector: str
    sliced: bool = False


ENCODERS = (
    EncoderKind("gne", "GNE (patch 14, merger)", "gne", "merger"),
    EncoderKind("sbe", "SBE (slices, merger)", "gne", "merger", sliced=True),
    EncoderKind("uhd", "ViT-UHD (mlp, 16x)", "uhd", "mlp"),
    EncoderKind("uhd_merger", "ViT-UHD + merger (64x)", "uhd", "merger"),
)
BY_KEY = {kind.key: kind for kind in ENCODERS}

BASE_VIT = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, pos_embed_grid=24, base_patch_size=14)
BASE_WTC = (2, 8)
SLICES = {"tiny": (112, 6), "base": (336, 9), "so400m-qwen2-7b": (336, 9)}
"""SBE (slice size, max slices) per shape; tiny matches ``vit_sbe_tiny_patch14_siglip``."""
FAMILIES = ("siglip", "moonvit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAPER_TTFT_MS = {"uhd": {512: 55, 768: 77, 1024: 121}, "gne": {512: 61, 768: 147, 1024: 297}}
"""The paper's TTFT plot with Qwen2-7B (read off the figure): ViT-UHD (16x) and MoonViT (GNE + 2x2 merger)."""
PAPER_FULL_MODEL_MS = {"LLaVA-UHD v3": 153.8, "Qwen2-VL-7B": 301.8}


def llm_config(shape: str, vocab_size: int) -> dict:
    """LLM config dict for ``load_llm``; ``vocab_size`` applies to tiny and base (the 7B keeps Qwen2's 152064)."""
    if shape == "so400m-qwen2-7b":
        return tiny_qwen2_config(152064, hidden_size=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944,
                                 tie_word_embeddings=False, max_position_embeddings=32768)
    if shape == "base":
        return tiny_qwen2_config(vocab_size, hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864,
                                 tie_word_embeddings=True, max_position_embeddings=32768)
    if shape == "tiny":
        return tiny_qwen2_config(vocab_size, max_position_embeddings=32768)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def build_vits(shape: str, family: str = "siglip") -> dict[str, nn.Module]:
    """The two ViTs of a shape (GNE and ViT-UHD) of ``family`` (``FAMILIES``), built on the current default
    device, random weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {FAMILIES}")
    if shape in ("so400m-qwen2-7b", "tiny"):
        size = "so400m" if shape == "so400m-qwen2-7b" else "tiny"
        names = {"gne": f"vit_gne_{size}_patch14_{family}", "uhd": f"vit_uhd_{size}_patch10_{family}"}
        return {key: timm.create_model(name) for key, name in names.items()}
    if shape == "base":
        from llava_uhd.vision.vit_uhd import MOONVIT_OPTIONS

        options = MOONVIT_OPTIONS if family == "moonvit" else {}
        return {"gne": create_vit_uhd(BASE_VIT, patch_size=14, wtc_layers=(), **options),
                "uhd": create_vit_uhd(BASE_VIT, patch_size=10, wtc_layers=BASE_WTC, **options)}
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def build_encoders(shape: str, llm_width: int, family: str = "siglip") -> dict[str, tuple[nn.Module, nn.Module]]:
    """(encoder, projector) per encoder kind. The ViTs are shared: SBE wraps the GNE ViT, and both ViT-UHD
    variants run the same ViT (sharing weights changes no FLOP and no timing)."""
    vits = build_vits(shape, family)
    slice_size, max_slices = SLICES[shape]
    sbe = SliceEncoder(vits["gne"], slice_size=slice_size, max_slices=max_slices)
    out = {}
    for kind in ENCODERS:
        encoder = sbe if kind.sliced else vits[kind.vit]
        out[kind.key] = (encoder, build_projector(kind.projector, encoder.embed_dim, llm_width))
    return out


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


CSV_FIELDS = [
    "shape", "encoder", "label", "request", "height", "width", "visual_tokens", "prompt_tokens",
    "encoder_flops", "projector_flops", "prefill_flops", "ttft_flops", "modeled_ttft_ms",
    "encoder_ms", "prefill_ms", "ttft_ms", "ttft_min_ms", "peak_mem_mb",
]


def text_token_count(tokenizer) -> int:
    """Prompt positions besides the visual tokens: ChatML system + user turn + assistant header."""
    from llava_uhd.conversation import build_prompt

    return len(build_prompt(PROMPT, tokenizer, [1])) - 1


def tiny_tokenizer(directory: str | Path | None = None):
    from llava_uhd.tokenizer import build_tiny_tokenizer

    if directory is None:
        directory = Path(tempfile.gettempdir()) / "llava_uhd_bench_tokenizer"
    return build_tiny_tokenizer(directory)


def _encoder_flops(encoder: nn.Module, height: int, width: int):
    """(FLOPs, output) of one meta-device forward of a ``height x width`` image."""
    out = []
    flops = count_flops(lambda: out.append(encoder(torch.empty(1, 3, height, width, device="meta"))))
    return flops, out[0]


def count_rows(shape: str, resolutions, text_tokens: int, vocab_size: int, kinds=ENCODERS,
               family: str = "siglip") -> list[Row]:
    """Tokens and FLOPs of every (encoder kind, square resolution), counted on the meta device."""
    config = llm_config(shape, vocab_size)
    with torch.device("meta"):
        llm = load_llm(config).eval()
        encoders = build_encoders(shape, config["hidden_size"], family)
    prefill_cache: dict[int, int] = {}
    rows = []
    for kind in kinds:
        encoder, projector = encoders[kind.key]
        encoder.eval()
        policy = resolution_policy(encoder, projector)
        for request in resolutions:
            height, width = policy.target_size(request, request)
            encoder_flops, encoded = _encoder_flops(encoder, height, width)
            projector_flops = count_flops(projector, encoded.tokens, encoded.grids)
            visual = count_image_tokens(encoder, projector, height, width)
            length = visual + text_tokens
            if length not in prefill_cache:
                embeds = torch.empty(1, length, config["hidden_size"], device="meta")
                prefill_cache[length] = count_flops(llm, inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            rows.append(Row(shape, kind.key, kind.label, request, height, width, visual, length, encoder_flops,
                            projector_flops, prefill_cache[length]))
    return rows


def flop_checks(text_tokens: int, tflops: float = DEFAULT_TFLOPS) -> dict:
    """The full-size figures the issue asks for: GNE SO400M/14 at 1022^2 (paper: 7.92 TFLOP), ViT-UHD at the size
    its policy gives a 1022 request, and the FLOP-modeled TTFT ratio GNE / ViT-UHD + merger at a 1024^2 request."""
    with torch.device("meta"):
        vits = build_vits("so400m-qwen2-7b")
    uhd_size = ResolutionPolicy(multiple=vits["uhd"].reduction).target_size(1022, 1022)
    gne_1022 = count_flops(vits["gne"], torch.empty(1, 3, 1022, 1022, device="meta"))
    uhd_same = count_flops(vits["uhd"], torch.empty(1, 3, *uhd_size, device="meta"))
    rows = count_rows("so400m-qwen2-7b", [1024], text_tokens, 0, kinds=(BY_KEY["gne"], BY_KEY["uhd_merger"]))
    gne, uhd = rows
    return {
        "gne_encoder_tflop_1022": gne_1022 / 1e12,
        "gne_encoder_tokens_1022": (1022 // 14) ** 2,
        "uhd_encoder_size_for_1022": list(uhd_size),
        "uhd_encoder_tflop_same_size": uhd_same / 1e12,
        "gne_ttft_tflop_1024": gne.ttft_flops / 1e12,
        "uhd_merger_ttft_tflop_1024": uhd.ttft_flops / 1e12,
        "ttft_flop_ratio_1024": gne.ttft_flops / uhd.ttft_flops,
        "modeled_ttft_ms_1024": {"gne": gne.ttft_flops / (tflops * 1e9), "uhd_merger": uhd.ttft_flops / (tflops * 1e9)},
    }


RELEASE_SETTING = {"uhd_mlp": ("vit_uhd_so400m_patch10_moonvit", "mlp"),
                   "gne_merger": ("vit_gne_so400m_patch14_moonvit", "merger")}
"""The released model (MoonViT ViT-UHD + mlp) and the paper's TTFT baseline (MoonViT GNE + merger)."""


def release_setting_flops(text_tokens: int, request: int = 1024) -> dict:
    """TTFT FLOPs of the release setting at a square ``request``, Qwen2-7B shape, under both resize rules
    (``default``: ours; ``release``: the released model's 1.4x upscale + floor), and GNE / ViT-UHD ratios.
    The paper reports 1.9x for this pair."""
    config = llm_config("so400m-qwen2-7b", 0)
    with torch.device("meta"):
        llm = load_llm(config).eval()
        parts = {key: (timm.create_model(name).eval(), build_projector(proj, 1152, config["hidden_size"]))
                 for key, (name, proj) in RELEASE_SETTING.items()}
    out: dict = {"request": request, "encoders": {k: f"{n} + {p}" for k, (n, p) in RELEASE_SETTING.items()}}
    for policy_name in ("default", "release"):
        entry = {}
        for key, (encoder, projector) in parts.items():
            height, width = resolution_policy(encoder, projector, name=policy_name).target_size(request, request)
            encoder_flops, encoded = _encoder_flops(encoder, height, width)
            projector_flops = count_flops(projector, encoded.tokens, encoded.grids)
            tokens = count_image_tokens(encoder, projector, height, width)
            embeds = torch.empty(1, tokens + text_tokens, config["hidden_size"], device="meta")
            prefill = count_flops(llm, inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            entry[key] = {"input": [height, width], "llm_tokens": tokens, "encoder_tflop": encoder_flops / 1e12,
                          "prefill_tflop": prefill / 1e12,
                          "ttft_tflop": (encoder_flops + projector_flops + prefill) / 1e12}
        entry["ttft_flop_ratio"] = entry["gne_merger"]["ttft_tflop"] / entry["uhd_mlp"]["ttft_tflop"]
        out[policy_name] = entry
    return out


# -- memory -------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Extra memory a block of work needs at its peak, in MiB (weights already resident are excluded).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
    before. CPU (Linux): the process RSS high-water mark (``VmHWM``) after resetting it through
    ``/proc/self/clear_refs``, minus the RSS before (freed heap first returned with ``malloc_trim``); where
    that is unavailable, the ``ru_maxrss`` delta, which only sees growth beyond the process's earlier peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated delta"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) minus RSS before, after malloc_trim"
        except OSError:
            return "resource.getrusage ru_maxrss delta (process-lifetime peak: lower bound)"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.proc = "clear_refs" in self.method(self.device)
        self.base = _status_kib("VmRSS") if self.proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.proc:
            self.mb = (_status_kib("VmHWM") - self.base) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * scale / 2**20


# -- timing -------------------------------------------------------------------------------------------------------
def ttft_step(model: LlavaUHD, input_ids: torch.Tensor, pixels: torch.Tensor) -> tuple[float, float]:
    """(encoder ms, prefill ms) of one request: image -> prompt embeddings -> first token (KV cache built).

    CUDA: timed with CUDA events around the two phases (one synchronisation at the end); CPU: wall clock."""
    device = input_ids.device
    if device.type == "cuda":
        start, encoded, done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        embeds = model.embed_inputs(input_ids, pixels)
        encoded.record()
        logits = model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits
        logits[0, -1].argmax()
        done.record()
        done.synchronize()
        return start.elapsed_time(encoded), encoded.elapsed_time(done)
    synchronize(device)
    start = time.perf_counter()
    embeds = model.embed_inputs(input_ids, pixels)
    synchronize(device)
    encoded = time.perf_counter()
    logits = model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits
    logits[0, -1].argmax().item()
    synchronize(device)
    return (encoded - start) * 1e3, (time.perf_counter() - encoded) * 1e3


def build_models(shape: str, tokenizer, device: torch.device, dtype: torch.dtype = torch.float32,
                 family: str = "siglip") -> dict[str, LlavaUHD]:
    """One LlavaUHD per encoder kind around a shared LLM, on ``device`` in ``dtype`` (random weights)."""
    config = llm_config(shape, len(tokenizer))
    with torch.device(device):  # full-size shapes are built where they run, not first in host memory
        llm = load_llm(config).to(dtype).eval()
        encoders = build_encoders(shape, config["hidden_size"], family)
    models = {}
    for key, (encoder, projector) in encoders.items():
        cfg = LlavaUHDConfig(encoder=BY_KEY[key].label, projector=BY_KEY[key].projector, llm=config)
        model = LlavaUHD(cfg, encoder=encoder, projector=projector, llm=llm, tokenizer=tokenizer)
        models[key] = model.to(device, dtype).eval()
    return models


def compile_models(models: dict[str, LlavaUHD]) -> None:
    """``torch.compile`` each distinct ViT, projector and the LLM in place (``nn.Module.compile``)."""
    seen: set[int] = set()
    for model in models.values():
        encoder = getattr(model.encoder, "base", model.encoder)  # SBE wraps the GNE ViT
        for module in (encoder, model.projector, model.llm):
            if id(module) not in seen:
                seen.add(id(module))
                module.compile()


def measure(rows: list[Row], shape: str, tokenizer, repeats: int, warmup: int, device: str, seed: int = 0,
            dtype: torch.dtype = torch.float32, family: str = "siglip", compiled: bool = False) -> None:
    """Fill the timing and memory fields of ``rows`` (one shape): per resolution, alternate encoders."""
    device = torch.device(device)
    torch.manual_seed(seed)
    models = build_models(shape, tokenizer, device, dtype, family)
    if compiled:
        compile_models(models)
    by_request: dict[int, list[Row]] = {}
    for row in rows:
        by_request.setdefault(row.request, []).append(row)
    with torch.inference_mode():  # models are built outside it: inference-mode parameters lose their version counter
        for request, group in by_request.items():
            _measure_group(models, group, f"{shape} {request}px", repeats, warmup, device)


def _measure_group(models: dict[str, LlavaUHD], group: list[Row], desc: str, repeats: int, warmup: int,
                   device: torch.device) -> None:
    """Rows of one resolution: warm-up rounds (the last probes peak memory), then alternating timed rounds."""
    inputs = {}
    for row in group:
        model = models[row.encoder]
        ids = model.build_prompt_ids(PROMPT, [(row.height, row.width)])
        if len(ids) != row.prompt_tokens:
            raise RuntimeError(f"{row.label}: {len(ids)} prompt tokens, the FLOP count assumed {row.prompt_tokens}")
        dtype = next(model.encoder.parameters()).dtype
        inputs[row.encoder] = (torch.tensor([ids], device=device),
                               torch.randn(1, 3, row.height, row.width, device=device, dtype=dtype))
    for _ in range(warmup - 1):
        for row in group:
            ttft_step(models[row.encoder], *inputs[row.encoder])
    for row in group:  # last warm-up round
        with PeakMemory(device) as probe:
            ttft_step(models[row.encoder], *inputs[row.encoder])
        row.peak_mem_mb = probe.mb
    for round_ in tqdm(range(repeats), desc=f"{desc}, encoders alternating", leave=False):
        shift = round_ % len(group)
        for row in group[shift:] + group[:shift]:
            encoder_ms, prefill_ms = ttft_step(models[row.encoder], *inputs[row.encoder])
            row.times_ms.append([encoder_ms, prefill_ms])
    for row in group:
        row.encoder_ms = statistics.median(t[0] for t in row.times_ms)
        row.prefill_ms = statistics.median(t[1] for t in row.times_ms)
        row.ttft_ms = statistics.median(t[0] + t[1] for t in row.times_ms)
        row.ttft_min_ms = min(t[0] + t[1] for t in row.times_ms)


def ratios(rows: list[Row]) -> list[dict]:
    """GNE / other encoder at each resolution: TTFT FLOP ratio and (when timed) wall-clock ratio."""
    out = []
    for request in dict.fromkeys(r.request for r in rows):
        group = {r.encoder: r for r in rows if r.request == request}
        if "gne" not in group:
            continue
        gne = group["gne"]
        for key, row in group.items():
            if key == "gne":
                continue
            entry = {"request": request, "encoder": key, "flop_ratio": gne.ttft_flops / row.ttft_flops}
            if gne.ttft_ms and row.ttft_ms:
                entry["wall_ratio"] = gne.ttft_ms / row.ttft_ms
                entry["wall_over_flop"] = entry["wall_ratio"] / entry["flop_ratio"]
                entry["wall_ratio_min"] = gne.ttft_min_ms / row.ttft_min_ms
            out.append(entry)
    return out


# -- output -------------------------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    timed = any(r.ttft_ms is not None for r in rows)
    unit, scale = ("GFLOP", 1e9) if rows and rows[0].shape == "tiny" else ("TFLOP", 1e12)
    header = ["encoder", "request", "input", "tokens", f"enc {unit}", f"proj {unit}", f"prefill {unit}",
              f"TTFT {unit}"]
    header += ["enc ms", "prefill ms", "TTFT ms", "TTFT min ms", "peak MiB"] if timed else ["modeled TTFT ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r.label, f"{r.request}^2", f"{r.height}x{r.width}", str(r.visual_tokens)]
        cells += [f"{v / scale:.3f}" for v in (r.encoder_flops, r.projector_flops, r.prefill_flops, r.ttft_flops)]
        if timed:
            cells += [f"{v:.1f}" for v in (r.encoder_ms, r.prefill_ms, r.ttft_ms, r.ttft_min_ms)]
            cells.append(f"{r.peak_mem_mb:.0f}")
        else:
            cells.append(f"{r.modeled_ttft_ms:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_ratios(entries: list[dict]) -> str:
    timed = any("wall_ratio" in e for e in entries)
    header = ["GNE / encoder", "request", "TTFT FLOP ratio"]
    header += ["wall-clock ratio (median)", "wall / FLOP", "wall-clock ratio (fastest round)"] if timed else []
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for e in entries:
        cells = [BY_KEY[e["encoder"]].label, f"{e['request']}^2", f"{e['flop_ratio']:.2f}x"]
        if timed:
            cells += [f"{e['wall_ratio']:.2f}x", f"{e['wall_over_flop']:.2f}", f"{e['wall_ratio_min']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def write(result: dict, rows: list[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"ttft_{result['shape']}{result.get('suffix', '')}"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".png")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            writer.writerow({k: round(values[k], 3) if isinstance(values[k], float) else values[k] for k in CSV_FIELDS})
    paths[1].write_text(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, paths[2], result["title"])
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=SHAPES, default="so400m-qwen2-7b",
                        help="so400m-qwen2-7b: FLOPs only (meta device), TTFT modeled; tiny, base: timed")
    parser.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS), help="square request sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the last one probes memory)")
    parser.add_argument("--device", default="cpu",
                        help="device for the timed shapes (cpu or cuda; with cuda every shape is timed)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--family", choices=[*FAMILIES, "both"], default=None,
                        help="ViTs: SigLIP-style, MoonViT-style (2-D RoPE), or both (default: both on CUDA)")
    parser.add_argument("--compile", action="store_true", help="also time every row under torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help="assumed sustained TFLOP/s for the modeled TTFT of the so400m-qwen2-7b shape")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ttft"))


def paper_lines(rows: list[Row]) -> list[str]:
    """Measured TTFT beside the paper's (Qwen2-7B), where the paper has a figure for the row."""
    lines = []
    for row in rows:
        paper = PAPER_TTFT_MS.get(row.encoder, {}).get(row.request)
        if paper is not None and row.ttft_ms is not None:
            lines.append(f"  {row.label:24s} {row.request}^2: measured {row.ttft_ms:7.1f} ms, paper ~{paper} ms")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: no CUDA device is available here")
    if any(r <= 0 for r in args.resolutions):
        raise SystemExit(f"error: --resolutions must be positive, got {args.resolutions}")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    family = args.family or ("both" if device.type == "cuda" else "siglip")
    timed = args.shape != "so400m-qwen2-7b" or device.type == "cuda"
    if timed and (args.repeats < 1 or args.warmup < 1):
        raise SystemExit("--repeats and --warmup must be >= 1 for a timed shape")
    if args.compile and not timed:
        raise SystemExit("error: --compile needs a timed run (--shape tiny / base, or --device cuda)")
    tokenizer = tiny_tokenizer()
    text_tokens = text_token_count(tokenizer)
    for fam in FAMILIES if family == "both" else (family,):
        for compiled in (False, True) if args.compile else (False,):
            run_one(args, tokenizer, text_tokens, fam, compiled, dtype, timed)
    return 0


def run_one(args: argparse.Namespace, tokenizer, text_tokens: int, family: str, compiled: bool, dtype: torch.dtype,
            timed: bool) -> None:
    """One table: the shape's four encoders of one ViT family, eager or compiled."""
    rows = count_rows(args.shape, args.resolutions, text_tokens, len(tokenizer), family=family)
    dtype_name = str(dtype).removeprefix("torch.")
    result = {
        "shape": args.shape,
        "command": "python -m llava_uhd.bench ttft " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["ttft"] else []),
        "prompt": PROMPT,
        "text_tokens": text_tokens,
        "llm": llm_config(args.shape, len(tokenizer)),
        "encoders": {k.key: k.label for k in ENCODERS},
        "family": family,
        "compiled": compiled,
        "suffix": ("" if family == "siglip" else f"_{family}") + ("_compiled" if compiled else ""),
        "flops": "torch FlopCounterMode on the meta device, batch 1; prefill with KV cache, last-position logits only",
    }
    if timed:
        measure(rows, args.shape, tokenizer, args.repeats, args.warmup, args.device, dtype=dtype, family=family,
                compiled=compiled)
        device = torch.device(args.device)
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else _machine()
        result.update(device=args.device, machine=machine, repeats=args.repeats, warmup=args.warmup,
                      memory=PeakMemory.method(device), dtype=dtype_name,
                      timing="CUDA events" if device.type == "cuda" else "wall clock (perf_counter)")
        result["title"] = (f"TTFT, {args.shape} shape, {family} ViTs, random weights, {dtype_name}"
                           f"{', torch.compile' if compiled else ''}, {args.device} ({machine}), "
                           f"median of {args.repeats}")
    else:
        for row in rows:
            row.modeled_ttft_ms = row.ttft_flops / (args.tflops * 1e9)
        result["throughput_tflops"] = args.tflops
        result["modeled_ttft"] = f"total FLOPs / {args.tflops:g} TFLOP/s sustained (assumption, not a measurement)"
        result["checks"] = flop_checks(text_tokens, args.tflops)
        result["release_setting"] = release_setting_flops(text_tokens)
        result["title"] = (f"TTFT modeled at {args.tflops:g} TFLOP/s sustained: SO400M {family} encoders + "
                           "Qwen2-7B shape")
    result["ratios"] = ratios(rows)
    paths = write(result, rows, args.out)

    print(result["title"])
    print(f"prompt: {text_tokens} text tokens + the visual tokens; FLOPs: {result['flops']}")
    if timed:
        print(f"peak memory: {result['memory']}; timing: {result['timing']}")
    print(format_table(rows))
    print("\nTTFT ratios, GNE over each encoder (wall-clock from the same alternating run):")
    print(format_ratios(result["ratios"]))
    if timed and args.shape == "so400m-qwen2-7b":
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
              f"(>= 3x: {'yes' if c['ttft_flop_ratio_1024'] >= 3 else 'NO'}); modeled at {args.tflops:g} TFLOP/s: "
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
