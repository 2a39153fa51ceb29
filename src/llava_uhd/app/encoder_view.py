"""What the encoder kept of one image: its final token grid, the WTC gate maps, and what other encoders would cost.

For an uploaded image, after the model's resize policy (``LlavaUHD.preprocess``, the pixels the model sees):

- the grid of final LLM tokens drawn on the image (one token per ``pixels_per_token`` square: 40 px for ViT-UHD
  with the ``mlp`` projector, against 28 px for the GNE with the 2x2 merger);
- for each WTC layer, every token's content-adaptive gate weight (channel mean) as a heatmap over the image,
  drawn by :func:`llava_uhd.vision.gate_maps.draw_gate_maps` as the training monitor draws it. The weights are
  read by forward hooks on the WTC modules during one encoder forward of this image. Average pooling (an
  ``avg`` WTC, or a content-adaptive gate still at its zero initialisation) gives 1/4 everywhere: one flat colour,
  and the view says so;
- the LLM tokens and encoder FLOPs of this image under GNE, SBE and ViT-UHD: the token benchmark's contenders
  (:data:`llava_uhd.bench.tokens.ENCODERS`, SO400M-shaped, the paper's setting), each built once on the meta device,
  the image sized by that encoder's own resolution policy, tokens from its ``num_image_tokens``, FLOPs from the
  benchmarks' counter (:func:`llava_uhd.profiling.count_flops`, one meta-device forward, attention as matmuls).
  A count takes about a second on a CPU, so counts are cached per (encoder, input size).

:func:`inspect_image` returns the numbers (:class:`EncoderView`, whose ``as_dict`` the API sends) and the two
pictures are drawn from those numbers, so a test can hold the picture's data against the encoder's own output.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from functools import cache, lru_cache

import timm
import torch
from PIL import Image, ImageDraw
from torch import nn

from llava_uhd.bench.tokens import ENCODERS, LLM_WIDTH, EncoderSpec
from llava_uhd.profiling import count_flops
from llava_uhd.projector import build_projector
from llava_uhd.vision.gate_maps import (
    AVERAGE_WEIGHT,
    display_pixels,
    draw_gate_maps,
    figure_png,
    gate_weight_map,
)
from llava_uhd.vision.vit_uhd import ViTUHD

from .uploads import InputError, Upload

UNIFORM_TOLERANCE = 1e-6
"""A map whose weights all lie this close to 1/4 is average pooling."""


def is_uniform(weights: torch.Tensor) -> bool:
    """Average pooling: every weight within ``UNIFORM_TOLERANCE`` of 1/4."""
    return float((weights.detach() - AVERAGE_WEIGHT).abs().max()) <= UNIFORM_TOLERANCE


@dataclass
class StageMap:
    """One WTC layer's gate weights for the image (row-major, on the token grid entering that layer)."""

    label: str
    pooling: str
    grid: tuple[int, int]
    weights: torch.Tensor | None
    """[h, w] channel-mean gate weight of every token; None where the pooling has no per-token weights."""
    note: str

    @property
    def uniform(self) -> bool:
        return self.weights is not None and is_uniform(self.weights)

    def as_dict(self) -> dict:
        weights = None if self.weights is None else [[float(v) for v in row] for row in self.weights.tolist()]
        return {"label": self.label, "pooling": self.pooling, "grid": list(self.grid), "uniform": self.uniform,
                "note": self.note, "weights": weights}


@dataclass
class EncoderView:
    """The numbers behind the encoder view of one image."""

    name: str
    original: tuple[int, int]
    encoded: tuple[int, int]
    pixels_per_token: int
    token_grid: tuple[int, int] | None
    tokens: int
    pixels: torch.Tensor
    """[3, H, W] normalised pixels the encoder saw."""
    stages: list[StageMap] = field(default_factory=list)
    costs: list[EncoderCost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"image": {"name": self.name, "original": list(self.original), "encoded": list(self.encoded)},
                "pixels_per_token": self.pixels_per_token, "tokens": self.tokens,
                "token_grid": list(self.token_grid) if self.token_grid else None,
                "stages": [s.as_dict() for s in self.stages], "compare": [c.as_dict() for c in self.costs],
                "notes": self.notes}


# -- what the image costs under each encoder --------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderCost:
    """One encoder's price for one image."""

    label: str
    encoded: tuple[int, int]
    """(height, width) after that encoder's resolution policy."""
    tokens: int
    """LLM positions the image takes."""
    flops: int | None
    """One encoder forward (multiply-add = 2); None when it cannot be counted."""

    def as_dict(self) -> dict:
        return {"encoder": self.label, "encoded": list(self.encoded), "tokens": self.tokens,
                "encoder_gflops": None if self.flops is None else round(self.flops / 1e9, 3)}


@lru_cache(maxsize=64)
def _meta_encoder(name: str, kwargs: tuple) -> nn.Module:
    """The timm encoder ``name`` built with ``kwargs`` on the meta device, once per process."""
    with torch.device("meta"):
        return timm.create_model(name, **dict(kwargs)).eval()


@lru_cache(maxsize=1024)
def _flops(name: str, kwargs: tuple, height: int, width: int) -> int:
    """Encoder FLOPs of one ``height x width`` image, counted once per (encoder, size)."""
    return count_flops(_meta_encoder(name, kwargs), torch.empty(1, 3, height, width, device="meta"))


@cache
def _projector(spec: EncoderSpec) -> nn.Module:
    with torch.device("meta"):
        return build_projector(spec.projector, _meta_encoder(spec.encoder, spec.encoder_kwargs).embed_dim, LLM_WIDTH)


def comparison(height: int, width: int) -> list[EncoderCost]:
    """Tokens and encoder FLOPs of an ``height x width`` image (as shown, before any resize) under each contender."""
    rows = []
    for spec in ENCODERS:
        encoder, projector = _meta_encoder(spec.encoder, spec.encoder_kwargs), _projector(spec)
        size = encoder.policy(projector).target_size(height, width)
        flops = _flops(spec.encoder, spec.encoder_kwargs, *size)  # ViT-UHD mlp and merger share one count
        rows.append(EncoderCost(spec.label, size, encoder.num_image_tokens(*size, projector), flops))
    return rows


def own_cost(model: nn.Module, encoded: tuple[int, int], label: str) -> EncoderCost:
    """The loaded model's cost at the size its policy gave (``encoded``); FLOPs from a meta-device copy of its
    encoder (ViT-UHD / GNE; the SBE's are not counted here: the table's SBE row has them)."""
    tokens = model.num_image_tokens(*encoded)
    encoder = model.encoder
    if not isinstance(encoder, ViTUHD):
        return EncoderCost(label, encoded, tokens, None)
    config = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in encoder.cfg.to_dict().items()))
    return EncoderCost(label, encoded, tokens, _flops(encoder.registry_name, config, *encoded))


# -- the view --------------------------------------------------------------------------------------------------------
def encoder_label(model) -> str:
    """``vit_uhd_so400m_patch10_siglip + mlp``: the loaded model's encoder and projector."""
    return f"{model.config.encoder} + {model.config.projector}"


def gate_maps(model, pixels: torch.Tensor, lock: threading.Lock) -> list[StageMap]:
    """One encoder forward of ``pixels`` [3, H, W] with hooks on every WTC; each layer's gate map."""
    encoder = model.encoder
    if not isinstance(encoder, ViTUHD) or not len(encoder.wtc):
        return []
    grids = encoder.stage_grids(*pixels.shape[-2:])
    levels = len(encoder.wtc)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(key: str):
        def hook(module, args, output) -> None:  # returns None: the module's output stays as it is
            seen.setdefault(key, args[0].detach())
        return hook

    handles = [wtc.register_forward_hook(keep_input(key)) for key, wtc in encoder.wtc.items()]
    device = next(encoder.parameters()).device
    try:
        with lock, torch.no_grad():
            model.run_encoder(pixels[None].to(device))
            stages = []
            for level, (key, wtc) in enumerate(encoder.wtc.items()):
                stages.append(_stage(f"block{key}", wtc, seen[key][0], grids[level], levels - level))
    finally:
        for handle in handles:
            handle.remove()
    return stages


def _stage(label: str, wtc, tokens: torch.Tensor, grid: tuple[int, int], levels_left: int) -> StageMap:
    if wtc.pooling == "content_adaptive":
        weights = gate_weight_map(wtc, tokens, grid, levels_left)
        note = ("content-adaptive gate still at average pooling: every weight is 1/4 (zero-initialised or "
                "untrained gate)") if is_uniform(weights) else ("content-adaptive: red tokens count more than their "
                                                                "window's average, blue ones less")
        return StageMap(label, wtc.pooling, grid, weights, note)
    if wtc.pooling == "avg":
        return StageMap(label, wtc.pooling, grid, torch.full(grid, AVERAGE_WEIGHT),
                        "average pooling: every weight is 1/4 by construction")
    return StageMap(label, wtc.pooling, grid, None, f"{wtc.pooling}: no per-token weights to show")


def inspect_image(model, upload: Upload, lock: threading.Lock) -> EncoderView:
    """The encoder view of one checked upload (the model is used under ``lock``)."""
    try:
        pixels = model.preprocess(upload.open())
    except Exception as err:  # checked at upload; a file PIL decodes once but not twice
        raise InputError(f"{upload.name}: cannot be decoded for the model ({err})") from err
    encoded = tuple(pixels.shape[-2:])
    token_grid = _token_grid(model, encoded)
    view = EncoderView(upload.name, (upload.height, upload.width), encoded, model.pixels_per_token, token_grid,
                       model.num_image_tokens(*encoded), pixels)
    view.stages = gate_maps(model, pixels, lock)
    if not view.stages:
        view.notes.append("this encoder has no WTC layer: nothing is merged inside it")
    view.costs = [*comparison(upload.height, upload.width),
                  own_cost(model, encoded, f"this model ({encoder_label(model)})")]
    return view


def _token_grid(model, encoded: tuple[int, int]) -> tuple[int, int] | None:
    """(rows, cols) of LLM tokens on the encoded image; None for the SBE (its slices are encoded apart)."""
    encoder = model.encoder
    if not isinstance(encoder, ViTUHD):
        return None
    return model.projector.output_grid(*encoder.output_grid(*encoded))


def token_grid_picture(view: EncoderView, min_width: int = 640) -> Image.Image:
    """The encoded image with a line between every two final tokens (enlarged to ``min_width`` if smaller)."""
    array = (display_pixels(view.pixels) * 255).round().astype("uint8")
    image = Image.fromarray(array)
    scale = max(1, -(-min_width // image.width))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if view.token_grid is None:
        return image
    draw = ImageDraw.Draw(image)
    step = view.pixels_per_token * scale
    rows, cols = view.token_grid
    for i in range(1, rows):
        draw.line([(0, i * step), (image.width, i * step)], fill=(255, 255, 0), width=max(1, scale // 2))
    for j in range(1, cols):
        draw.line([(j * step, 0), (j * step, image.height)], fill=(255, 255, 0), width=max(1, scale // 2))
    return image


def gate_picture(view: EncoderView) -> Image.Image | None:
    """The gate maps laid over the encoded image (the training monitor's picture); None without any map."""
    maps = {s.label: s.weights for s in view.stages if s.weights is not None}
    if not maps:
        return None
    titles = {s.label: f"{s.label}: {'average pooling (all 1/4)' if s.uniform else 'gate weight'} "
              f"{s.grid[0]}x{s.grid[1]}" for s in view.stages if s.weights is not None}
    h, w = view.encoded
    figure = draw_gate_maps(view.pixels, maps, titles=titles, input_title=f"encoder input {h}x{w}")
    return Image.open(io.BytesIO(figure_png(figure))).convert("RGB")


def _gflops(flops: int | None) -> str:
    if flops is None:
        return "n/a"
    return f"{flops / 1e9:,.1f}" if flops >= 1e9 else f"{flops / 1e9:.4f}"


def cost_table(view: EncoderView) -> str:
    """Markdown: tokens and encoder FLOPs of this image under each encoder, and the notes."""
    (oh, ow), (eh, ew), ppt = view.original, view.encoded, view.pixels_per_token
    grid = f", {view.token_grid[0]}x{view.token_grid[1]} tokens of {ppt}x{ppt} px" if view.token_grid else ""
    lines = [f"**{view.tokens} LLM tokens** for this image ({oh}x{ow} uploaded, {eh}x{ew} encoded{grid}).", "",
             "| encoder | input after its resize policy | LLM tokens | encoder GFLOPs |",
             "| --- | --- | ---: | ---: |"]
    lines += [f"| {c.label} | {c.encoded[0]}x{c.encoded[1]} | {c.tokens:,} | {_gflops(c.flops)} |" for c in view.costs]
    lines += ["", "GNE, SBE and ViT-UHD rows: SO400M encoders (the paper's comparison) feeding a Qwen2-7B-width "
              "projector; FLOPs of one encoder forward, counted on the meta device.", ""]
    lines += [f"- **{s.label}** ({s.grid[0]}x{s.grid[1]} tokens in): {s.note}" for s in view.stages]
    lines += [f"- {note}" for note in view.notes]
    return "\n".join(lines)
