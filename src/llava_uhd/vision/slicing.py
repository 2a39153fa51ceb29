"""Slice-based encoding (SBE): the LLaVA-UHD v1 style baseline the paper compares ViT-UHD against.

An image is cut into a grid of square slices of the encoder's native size, chosen for the image's
aspect ratio and area (at most ``max_slices``), plus a low-resolution thumbnail of the whole image.
Every view (thumbnail and slices) is encoded independently at the same fixed size, as one batch, by
a plain ViT (the global native-resolution ``vit_gne_*`` model: patch 14, no WTC).

Preprocessing: :class:`SliceGridPolicy` is this encoder's resolution policy. It picks the grid
(rows, cols) LLaVA-UHD v1 style and resizes the image to exactly ``rows*S x cols*S`` pixels, so the
encoder cuts slices with a reshape. Only the thumbnail is resampled, inside the encoder.

Token stream of one image in the LLM sequence (S = slice grid, t = tokens per view after the projector)::

    [thumbnail t] <|row_sep|> [slice 0,0 t] <|slice_sep|> [slice 0,1 t] ... <|row_sep|> [slice 1,0 t] ...

that is ``(rows*cols + 1) * t + rows*cols`` positions: one ``<|row_sep|>`` before each row of slices and
one ``<|slice_sep|>`` between neighbouring slices of a row. A 1x1 grid is the image itself: ``t`` tokens,
no thumbnail, no separators. The data pipeline expands ``<image>`` to that many ``<|image_pad|>`` ids;
the model fills the view positions with projected tokens and the separator positions with the LLM's own
embeddings of the separator tokens (see :meth:`SliceEncoder.join`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from llava_uhd.tokens import ImageTokenCounter, views_per_image

__all__ = ["SliceEncoder", "SliceGridPolicy", "SlicedOutput", "views_per_image"]


@dataclass(frozen=True)
class SliceGridPolicy:
    """LLaVA-UHD v1 slice grid: square slices of ``slice_size``, at most ``max_slices`` of them."""

    slice_size: int = 336
    """Side of every slice and of the thumbnail, in pixels (the encoder's native input size)."""
    max_slices: int = 9
    """Upper bound on rows x cols."""

    def __post_init__(self) -> None:
        if self.slice_size <= 0 or self.max_slices <= 0:
            raise ValueError(f"slice_size and max_slices must be positive, got {self.slice_size}, {self.max_slices}")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) for an image of ``height x width`` pixels.

        The ideal slice count is the image area over the slice area (rounded up, capped). Among grids
        with that count or one more or less, take the one closest in log aspect ratio; ties go to the
        count closest to the ideal, then to more slices.
        """
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        ideal = min(self.max_slices, max(1, math.ceil(height * width / self.slice_size**2)))
        if ideal == 1:
            return 1, 1
        counts = [n for n in (ideal - 1, ideal, ideal + 1) if 1 <= n <= self.max_slices]
        grids = [(r, n // r) for n in counts for r in range(1, n + 1) if n % r == 0]
        log_aspect = math.log(height / width)
        return min(
            grids,
            key=lambda g: (
                round(abs(log_aspect - math.log(g[0] / g[1])), 6),
                abs(g[0] * g[1] - ideal),
                -g[0] * g[1],
                g[0],
            ),
        )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) to resize to: the slice grid times the slice size (the ``preprocess`` policy hook)."""
        rows, cols = self.grid(height, width)
        return rows * self.slice_size, cols * self.slice_size


@dataclass
class SlicedOutput:
    """What :class:`SliceEncoder` returns: every view's tokens, plus how each image was sliced."""

    tokens: torch.Tensor
    """[V, n, C]: all views of all images (per image: thumbnail first, then slices row-major)."""
    grids: list[tuple[int, int]]
    """Token grid of every view (all equal)."""
    layouts: list[tuple[int, int]] = field(default_factory=list)
    """(rows, cols) slice grid of every image."""


class SliceEncoder(nn.Module):
    """Encodes a thumbnail and fixed-size slices of each image independently with a plain ViT."""

    def __init__(self, base: str | nn.Module, slice_size: int = 336, max_slices: int = 9, **base_kwargs) -> None:
        super().__init__()
        self.base = timm.create_model(base, **base_kwargs) if isinstance(base, str) else base
        self.grid_policy = SliceGridPolicy(slice_size, max_slices)
        self.embed_dim = self.base.embed_dim
        self.view_grid = self.base.output_grid(slice_size, slice_size)

    @property
    def slice_size(self) -> int:
        return self.grid_policy.slice_size

    @property
    def reduction(self) -> int:
        """Pixels per token side inside a slice."""
        return self.base.reduction

    def layout(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of a preprocessed image, whose sides are multiples of the slice size."""
        s = self.slice_size
        if height % s or width % s:
            raise ValueError(f"SBE input {height}x{width} is not a grid of {s}px slices; "
                             "preprocess with .policy(projector)")
        return height // s, width // s

    # -- token-count interface (shared by every encoder kind: llava_uhd.tokens) ---------------------------------
    def num_image_tokens(self, height: int, width: int, projector: nn.Module) -> int:
        """LLM positions one preprocessed ``height x width`` image takes, separators included."""
        self.layout(height, width)  # a size that is no slice grid is an error here, not a floored count
        return self.token_counter(projector)(height, width)

    def policy(
        self, projector: nn.Module, min_pixels: int = 512 * 512, max_pixels: int = 1560 * 1560, max_side: int = 5120,
        name: str = "default",
    ) -> SliceGridPolicy:
        """The slice grid: every view is encoded at the fixed slice size, so the area limits, the side cap and
        the policy name (which native-resolution encoders take) do not apply and are ignored."""
        return self.grid_policy

    def token_counter(self, projector: nn.Module) -> ImageTokenCounter:
        """A picklable ``(height, width) -> LLM tokens`` equal to :meth:`num_image_tokens`, for data workers."""
        gh, gw = projector.output_grid(*self.view_grid)
        return ImageTokenCounter(self.reduction * projector.merge, self.slice_size, gh * gw)

    def views(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """One preprocessed [3, H, W] image -> its views [V, 3, S, S] (thumbnail first, then slices row-major;
        a 1x1 grid: the image alone) and its (rows, cols) slice grid."""
        channels, height, width = image.shape
        rows, cols = self.layout(height, width)
        s = self.slice_size
        slices = image.view(channels, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(rows * cols, channels, s, s)
        if rows * cols == 1:
            return slices, (rows, cols)
        thumbnail = F.interpolate(image[None], size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([thumbnail.to(image.dtype), slices]), (rows, cols)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> SlicedOutput:
        views, layouts = zip(*(self.views(image) for image in x))
        out = self.base(torch.cat(views))
        return SlicedOutput(tokens=out.tokens, grids=list(out.grids), layouts=list(layouts))

    @staticmethod
    def join_index(layouts: list[tuple[int, int]], tokens_per_view: int, device=None) -> torch.Tensor:
        """Gather index that interleaves projected view tokens with separators.

        Indexes into ``cat([view_tokens (V*t rows), slice_sep, row_sep])``; the result is every image's
        token stream (module docstring) back to back.
        """
        t = tokens_per_view
        total_views = sum(views_per_image(r, c) for r, c in layouts)
        slice_sep, row_sep = total_views * t, total_views * t + 1
        index, view = [], 0
        for rows, cols in layouts:
            index.extend(range(view * t, (view + 1) * t))  # thumbnail, or the only view of a 1x1 grid
            view += 1
            if rows * cols == 1:
                continue
            for _ in range(rows):
                index.append(row_sep)
                for c in range(cols):
                    if c:
                        index.append(slice_sep)
                    index.extend(range(view * t, (view + 1) * t))
                    view += 1
        return torch.tensor(index, dtype=torch.long, device=device)

    def join(self, view_tokens: torch.Tensor, layouts: list[tuple[int, int]], separators: torch.Tensor) -> torch.Tensor:
        """Projected view tokens [V*t, D] + separator embeddings [2, D] (slice_sep, row_sep) -> [sum N_i, D]."""
        total_views = sum(views_per_image(r, c) for r, c in layouts)
        if view_tokens.shape[0] % total_views:
            raise ValueError(f"{view_tokens.shape[0]} view tokens do not split into {total_views} views")
        index = self.join_index(layouts, view_tokens.shape[0] // total_views, view_tokens.device)
        return torch.cat([view_tokens, separators.to(view_tokens.dtype)]).index_select(0, index)


def _create_sbe(base: str, **kwargs) -> SliceEncoder:
    for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return SliceEncoder(base, **kwargs)


@register_model
def vit_sbe_tiny_patch14_siglip(pretrained: bool = False, **kwargs) -> SliceEncoder:
    """Tiny SBE for tests: 112 px slices (8x8 patches) of the tiny patch-14 ViT, at most 6 slices."""
    return _create_sbe("vit_gne_tiny_patch14_siglip", **{"slice_size": 112, "max_slices": 6, **kwargs})


@register_model
def vit_sbe_so400m_patch14_siglip(pretrained: bool = False, **kwargs) -> SliceEncoder:
    """SO400M/14 SBE: 336 px slices (24x24 patches), at most 9 slices plus the thumbnail."""
    return _create_sbe("vit_gne_so400m_patch14_siglip", **{"slice_size": 336, "max_slices": 9, **kwargs})
