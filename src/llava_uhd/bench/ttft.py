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

The contenders are built in ``llava_uhd.bench.ttft_models``; tables, files and the printed summary are in
``llava_uhd.bench.ttft_report``; timing and peak memory come from ``llava_uhd.profiling``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm import tqdm

from llava_uhd.bench.ttft_models import (
    BY_KEY,
    ENCODERS,
    FAMILIES,
    SHAPES,
    build_encoders,
    build_models,
    build_vits,
    compile_models,
    llm_config,
)
from llava_uhd.bench.ttft_report import Row, print_summary, write
from llava_uhd.llm import load_llm
from llava_uhd.mllm import LlavaUHD
from llava_uhd.profiling import (
    DTYPES,
    PeakMemory,
    count_flops,
    elapsed_ms,
    machine_name,
    mark,
    pick_device,
    synchronize,
)
from llava_uhd.projector import build_projector
from llava_uhd.vision.resize import ResolutionPolicy

RESOLUTIONS = (512, 768, 1024, 1536, 2048)
PROMPT = "What is in the image? Answer briefly."
DEFAULT_TFLOPS = 125.0
"""Assumed sustained throughput for the modeled TTFT: about 40% of an A100's 312 TFLOP/s bf16 dense peak,
close to what the paper's TTFT plot implies for ~8-28 TFLOP of work."""


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
        policy = encoder.policy(projector)
        for request in resolutions:
            height, width = policy.target_size(request, request)
            encoder_flops, encoded = _encoder_flops(encoder, height, width)
            projector_flops = count_flops(projector, encoded.tokens, encoded.grids)
            visual = encoder.num_image_tokens(height, width, projector)
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
            height, width = encoder.policy(projector, name=policy_name).target_size(request, request)
            encoder_flops, encoded = _encoder_flops(encoder, height, width)
            projector_flops = count_flops(projector, encoded.tokens, encoded.grids)
            tokens = encoder.num_image_tokens(height, width, projector)
            embeds = torch.empty(1, tokens + text_tokens, config["hidden_size"], device="meta")
            prefill = count_flops(llm, inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            entry[key] = {"input": [height, width], "llm_tokens": tokens, "encoder_tflop": encoder_flops / 1e12,
                          "prefill_tflop": prefill / 1e12,
                          "ttft_tflop": (encoder_flops + projector_flops + prefill) / 1e12}
        entry["ttft_flop_ratio"] = entry["gne_merger"]["ttft_tflop"] / entry["uhd_mlp"]["ttft_tflop"]
        out[policy_name] = entry
    return out


# -- timing -------------------------------------------------------------------------------------------------------
def ttft_step(model: LlavaUHD, input_ids: torch.Tensor, pixels: torch.Tensor) -> tuple[float, float]:
    """(encoder ms, prefill ms) of one request: image -> prompt embeddings -> first token (KV cache built).

    CUDA: timed with CUDA events around the two phases (one synchronisation at the end); CPU: wall clock."""
    device = input_ids.device
    start = mark(device)
    embeds = model.embed_inputs(input_ids, pixels)
    encoded = mark(device)
    logits = model.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits
    logits[0, -1].argmax()
    done = mark(device)
    synchronize(device)
    return elapsed_ms(start, encoded), elapsed_ms(encoded, done)


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


def run(args: argparse.Namespace) -> int:
    """Count, time (where the shape is timed), write and print one table per ViT family (and compile mode)."""
    try:
        device, dtype = pick_device(args.device, args.dtype)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(r <= 0 for r in args.resolutions):
        raise SystemExit(f"error: --resolutions must be positive, got {args.resolutions}")
    family = args.family or ("both" if device.type == "cuda" else "siglip")
    timed = args.shape != "so400m-qwen2-7b" or device.type == "cuda"
    if timed and (args.repeats < 1 or args.warmup < 1):
        raise SystemExit("error: --repeats and --warmup must be >= 1 for a timed shape")
    if args.compile and not timed:
        raise SystemExit("error: --compile needs a timed run (--shape tiny / base, or --device cuda)")
    try:  # before minutes of counting and timing: a results folder that cannot be made is one message now
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"error: --out {args.out}: cannot create the results folder ({err.strerror})") from None
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
        "command": args.command_line,
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
        machine = machine_name(device)
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
    print_summary(result, rows, timed, args.tflops, paths)
