"""Options shared by the encoder benchmarks (``bench roofline``, ``bench pack``): the encoder pair, the rounds,
device / dtype / threads and the results folder, checked before any timing so that bad input is one message."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import llava_uhd.vision  # noqa: F401  (registers the vit_uhd_* / vit_gne_* timm models)
from llava_uhd.profiling import DTYPES

PAIRS = {
    "so400m": ("vit_uhd_so400m_patch10_siglip", "vit_gne_so400m_patch14_siglip"),
    "tiny": ("vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_siglip"),
}
"""(ViT-UHD, GNE) timm names per ``--shape``."""


def add_encoder_options(parser: argparse.ArgumentParser, repeats: int = 3, out: str = "runs/bench") -> None:
    """``--shape --repeats --warmup --device --dtype --threads --out``; the parser is kept for error messages."""
    parser.add_argument("--shape", choices=sorted(PAIRS), default="so400m")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.set_defaults(parser=parser)


def encoder_names() -> list[str]:
    """Every encoder the benchmarks can build."""
    return timm.list_models("vit_uhd_*") + timm.list_models("vit_gne_*")


def checked_run(args: argparse.Namespace, measure: Callable[[], dict], write: Callable[[dict, Path], list[Path]],
                show: Callable[[dict], None]) -> dict:
    """Check the shared options, apply ``--threads``, make ``--out``, then measure, write and print; every
    failure is one ``error: ...`` line and exit status 2 (``args.parser``), never a traceback."""
    parser: argparse.ArgumentParser = args.parser
    bad = args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1)
    rule = "--repeats and --threads must be >= 1, --warmup >= 0"
    if "resolution" in vars(args):
        bad, rule = bad or args.resolution <= 0, rule + ", --resolution > 0"
    if bad:
        parser.error(rule)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # before minutes of timing: a results folder that cannot be made is one message now
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.exit(2, f"error: --out {args.out}: cannot create the results folder ({err.strerror})\n")
    try:
        result = measure()
        result["command"] = args.command_line
        paths = write(result, args.out)
        show(result)
    except (ValueError, RuntimeError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print("written: " + ", ".join(str(p) for p in paths))
    return result
