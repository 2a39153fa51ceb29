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


class RopeTables:
    """One encoder's RoPE tables, cached per (grid, levels to come, device).

    The tables are fixed (no parameters, no gradient), so they are always cached, and built outside inference mode
    so that a table first made under ``torch.inference_mode`` (validation, generation) can be saved for backward."""

    def __init__(self, head_dim: int, theta: float, levels: int, max_entries: int = 256) -> None:
        self.head_dim, self.theta, self.levels, self.max_entries = head_dim, theta, levels, max_entries
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, grid: tuple[int, int], levels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos) [h*w, head_dim] for ``grid`` in window-major order with ``levels`` WTC steps to come."""
        key = (grid, levels, device)
        table = self.cache.get(key)
        if table is None:
            if len(self.cache) > self.max_entries:
                self.cache.clear()
            with torch.inference_mode(False):  # a table first built for inference must serve training too
                table = rope_table(grid[0], grid[1], levels, self.head_dim, self.theta, device=device)
            self.cache[key] = table
        return table

    def at(self, grids: list[tuple[int, int]], level: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table of a whole sequence (one patch grid per image, in order) after ``level`` WTC steps."""
        tables = [self.table((h >> level, w >> level), self.levels - level, device) for h, w in grids]
        if len(tables) == 1:
            return tables[0]
        return torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables])
