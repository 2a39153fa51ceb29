"""2-D rotary position embedding (RoPE) as Kimi-VL's MoonViT applies it in every block.

A head's channels (2j, 2j+1) form complex number j. With ``head_dim / 4`` frequencies
``f_k = theta ** (-4k / head_dim)``, complex slot ``2k`` turns by ``col * f_k`` and slot ``2k + 1`` by
``row * f_k``: channels (4k, 4k+1) follow the column, (4k+2, 4k+3) the row. This is timm's *interleaved*
layout (``apply_rot_embed(..., half=False)``: ``x * cos + rot(x) * sin`` with ``rot`` pairing (x0, x1) ->
(-x1, x0)), so the rotation itself is timm's; only the angle table is MoonViT's own and is built here.

Positions are the integer (row, col) of each token in the grid it is on *now*: after a 2x2 WTC the coarser
grid's indices 0..h'-1, 0..w'-1. Inside ViT-UHD tokens run window-major, so the table is permuted the same
way (:func:`rope_table`).
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed

from .pvc import window_major_order

ROPE_KINDS = ("none", "2d")


def rope_frequencies(head_dim: int, theta: float = 10000.0, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``head_dim / 4`` angular frequencies ``theta ** (-4k / head_dim)`` in fp32."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    k = torch.arange(head_dim // 4, dtype=torch.float32, device=device)
    return theta ** (-4.0 * k / head_dim)


def rope_angles(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle of every complex slot for tokens at (rows[n], cols[n]): [N, head_dim / 2], fp32.

    Slot 2k holds ``col * f_k``, slot 2k + 1 ``row * f_k``.
    """
    freqs = rope_frequencies(head_dim, theta, device=rows.device)
    by_col = cols.float()[:, None] * freqs  # N, head_dim/4
    by_row = rows.float()[:, None] * freqs
    return torch.stack([by_col, by_row], dim=-1).flatten(1)


def rope_sin_cos(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) [N, head_dim] in timm's interleaved layout (each angle repeated for its channel pair)."""
    angles = rope_angles(rows, cols, head_dim, theta).repeat_interleave(2, dim=-1)
    return angles.sin(), angles.cos()


def rope_table(
    height: int,
    width: int,
    levels: int,
    head_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) for every token of an ``height x width`` grid in the order ViT-UHD keeps its tokens:
    window-major with ``levels`` 2x2 compressions still to come (row-major when ``levels`` is 0)."""
    rows = torch.arange(height).view(-1, 1).expand(height, width).reshape(-1)
    cols = torch.arange(width).view(1, -1).expand(height, width).reshape(-1)
    if levels:
        order = window_major_order(height, width, levels)
        rows, cols = rows[order], cols[order]
    sin, cos = rope_sin_cos(rows, cols, head_dim, theta)
    return sin.to(device), cos.to(device)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate q or k ``[..., N, head_dim]`` in fp32 and cast back to its dtype."""
    return apply_rot_embed(x.float(), sin, cos, half=False).to(x.dtype)
