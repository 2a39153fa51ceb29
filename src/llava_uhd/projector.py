"""Vision-to-language projectors of LLaVA-UHD v3 (arXiv 2511.21150; docs/design.md, "The projector").

The encoder emits one token per ``encoder.reduction`` pixels of side (40 for ViT-UHD: patch 10 and
two 2x2 WTC steps). The projector maps the encoder width C to the LLM width D:

- ``mlp``:    Linear(C, D) -> GELU -> Linear(D, D), one LLM token per encoder token (16x total for ViT-UHD).
- ``merger``: LayerNorm(C) -> concat each 2x2 window (4C) -> Linear(4C, 4C) -> GELU -> Linear(4C, D),
  one LLM token per 2x2 encoder tokens (64x total; the MoonViT / Qwen2-VL style merge of the global
  native-resolution baseline, and in only some of the paper's experiment checkpoints).

``mlp`` is the released LLaVA-UHD v3's projector (its ``model.mm_projector.proj.0/.2``, exact GELU) and the
setting of the paper's 1.9x TTFT claim.

Both take the encoder's tokens in row-major order of each image's grid, dense ``[B, n, C]`` (all images
the same grid) or packed ``[sum n_i, C]``, plus the per-image grids, and return packed ``[sum m_i, D]``
tokens in row-major order of the output grids, ready to be spliced into the LLM sequence.
"""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_KINDS = ("mlp", "merger")


def _flatten(tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """Dense [B, n, C] or packed [sum n, C] -> packed, checking the token count against the grids."""
    if tokens.dim() == 3:
        tokens = tokens.reshape(-1, tokens.shape[-1])
    expected = sum(h * w for h, w in grids)
    if tokens.dim() != 2 or tokens.shape[0] != expected:
        raise ValueError(f"got tokens of shape {tuple(tokens.shape)} for grids {grids} ({expected} tokens)")
    return tokens


class MLPProjector(nn.Module):
    """Two-layer MLP applied to every encoder token: no further compression."""

    merge = 1
    """Encoder tokens per output token along each side."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def forward(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(_flatten(tokens, grids))))


class PatchMergerProjector(nn.Module):
    """LayerNorm, then every 2x2 window of the token grid is concatenated and mapped by an MLP to one token."""

    merge = 2

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(4 * in_dim, 4 * in_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * in_dim, out_dim)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        if height % 2 or width % 2:
            raise ValueError(f"the 2x2 merger needs an even token grid, got {height}x{width}")
        return height // 2, width // 2

    def _windows(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Packed row-major tokens -> [sum n/4, 4C], each row one 2x2 window, windows in row-major order."""
        channels = tokens.shape[-1]
        if len(set(grids)) == 1:  # one grid for all images: a single batched view
            (h, w), batch = grids[0], len(grids)
            self.output_grid(h, w)
            x = tokens.view(batch, h // 2, 2, w // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
            return x.reshape(-1, 4 * channels)
        parts = []
        for x, (h, w) in zip(tokens.split([h * w for h, w in grids]), grids):
            self.output_grid(h, w)
            x = x.view(h // 2, 2, w // 2, 2, channels).permute(0, 2, 1, 3, 4)
            parts.append(x.reshape(-1, 4 * channels))
        return torch.cat(parts)

    def forward(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self._windows(self.norm(_flatten(tokens, grids)), grids)
        return self.fc2(self.act(self.fc1(x)))


def build_projector(kind: str, in_dim: int, out_dim: int) -> MLPProjector | PatchMergerProjector:
    """Projector by name: ``mlp`` (16x total with ViT-UHD: the release's) or ``merger`` (64x total)."""
    if kind == "mlp":
        return MLPProjector(in_dim, out_dim)
    if kind == "merger":
        return PatchMergerProjector(in_dim, out_dim)
    raise ValueError(f"unknown projector kind {kind!r}; expected one of {PROJECTOR_KINDS}")
