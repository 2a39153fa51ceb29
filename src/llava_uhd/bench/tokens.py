"""Visual tokens that reach the LLM, per encoder kind and input resolution (full SO400M shapes).

Every encoder is built on the meta device (no memory, no weights), the input size goes through the
encoder's resolution policy exactly as ``LlavaUHD.preprocess`` does, and the count comes from the
same ``encoder.num_image_tokens`` the model and the data pipeline use (:mod:`llava_uhd.tokens`):

- native-resolution encoders: aspect ratio kept, area clamped to [512^2, 1560^2], each side snapped to
  a multiple of the pixels per LLM token (ViT-UHD mlp 40, ViT-UHD merger 80, GNE merger 28); for
  example 1024 -> 1040 for a multiple of 40, 2048 -> 1560 (area cap);
- SBE: the LLaVA-UHD v1 slice grid of 336 px slices (at most 9) plus a thumbnail; separators included.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import timm
import torch

import llava_uhd.vision.slicing  # noqa: F401  (registers the vit_uhd_* / vit_gne_* / vit_sbe_* timm models)
from llava_uhd.bench.report import markdown_table
from llava_uhd.projector import build_projector

LLM_WIDTH = 3584  # Qwen2-7B


@dataclass(frozen=True)
class EncoderSpec:
    label: str
    encoder: str
    projector: str
    encoder_kwargs: tuple[tuple[str, object], ...] = ()


ENCODERS = (
    EncoderSpec("GNE (patch 14, merger)", "vit_gne_so400m_patch14_siglip", "merger"),
    EncoderSpec("SBE (336 px slices, merger)", "vit_sbe_so400m_patch14_siglip", "merger"),
    EncoderSpec("ViT-UHD (mlp, 16x)", "vit_uhd_so400m_patch10_siglip", "mlp"),
    EncoderSpec("ViT-UHD (merger, 64x)", "vit_uhd_so400m_patch10_siglip", "merger"),
)


@dataclass(frozen=True)
class TokenCount:
    label: str
    resolution: tuple[int, int]
    """Input image (height, width)."""
    encoded: tuple[int, int]
    """(height, width) after the resolution policy."""
    tokens: int


def token_counts(resolutions: list[tuple[int, int]], encoders=ENCODERS) -> list[TokenCount]:
    """LLM visual tokens for every (encoder, resolution) pair."""
    rows = []
    for spec in encoders:
        with torch.device("meta"):
            encoder = timm.create_model(spec.encoder, **dict(spec.encoder_kwargs))
            projector = build_projector(spec.projector, encoder.embed_dim, LLM_WIDTH)
        policy = encoder.policy(projector)
        for height, width in resolutions:
            size = policy.target_size(height, width)
            rows.append(TokenCount(spec.label, (height, width), size, encoder.num_image_tokens(*size, projector)))
    return rows


def format_table(rows: list[TokenCount]) -> str:
    """Markdown table: one row per encoder, one column per input resolution ("tokens (encoded size)")."""
    resolutions = list(dict.fromkeys(r.resolution for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    cell = {(r.label, r.resolution): f"{r.tokens} ({r.encoded[0]}x{r.encoded[1]})" for r in rows}
    header = ["encoder"] + [f"{h}x{w}" if h != w else f"{h}^2" for h, w in resolutions]
    return markdown_table(header, [[label] + [cell[label, res] for res in resolutions] for label in labels])


def _resolution(text: str) -> tuple[int, int]:
    """``1024`` (square) or ``768x1024`` (height x width), positive sides."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) <= 0:
        raise argparse.ArgumentTypeError(f"bad resolution {text!r}: use positive sides, 1024 or 768x1024")
    return (sides[0], sides[-1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolutions", nargs="+", type=_resolution, default=[_resolution(r) for r in
                        ("512", "768", "1024", "2048")], help="input sizes: 1024 (square) or HxW")


def run(args: argparse.Namespace) -> int:
    print("LLM visual tokens (encoded size after the resolution policy), SO400M encoders, Qwen2-7B width")
    print(format_table(token_counts(args.resolutions)))
    return 0
