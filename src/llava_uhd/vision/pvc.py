"""Progressive Visual Compression (PVC) parts: Refined Patch Embedding and Windowed Token Compression.

From "LLaVA-UHD v3: Progressive Visual Compression for Efficient Native-Resolution Encoding in MLLMs"
(arXiv 2511.21150), section 3.1.

* Refined Patch Embedding (RPE) re-derives a patch-embedding kernel for a smaller patch (14 -> 10) with
  FlexiViT's pseudo-inverse resize, so that tokens of an image shrunk by 10/14 with the new kernel match
  tokens of the original image with the old kernel in the least-squares sense. timm implements the
  PI-resize (``timm.layers.resample_patch_embed``); this module only wraps it for full-precision use.
* Windowed Token Compression (WTC) merges every 2x2 window of the token grid into one token after
  chosen ViT blocks. Tokens arrive *window-major* (the four tokens of a window are contiguous), so a
  compression step is a ``view(..., 4, C)`` whatever the image sizes in a packed sequence.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from timm.layers import resample_patch_embed
from torch import nn

POOLING_KINDS = ("avg", "content_adaptive", "pixel_unshuffle")
WINDOW = 4  # tokens per 2x2 window


def refine_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """PI-resize a conv patch-embedding kernel [D, 3, p, p] to ``patch_size``, computed once in fp32."""
    if weight.shape[-1] == patch_size and weight.shape[-2] == patch_size:
        return weight
    resized = resample_patch_embed(weight.float(), [patch_size, patch_size], interpolation="bicubic", antialias=True)
    return resized.to(weight.dtype)


def window_major_order(height: int, width: int, levels: int) -> torch.Tensor:
    """Permutation taking row-major tokens of an ``height x width`` grid to window-major order.

    The key of token (i, j) is its cell in the final grid (i >> levels, j >> levels), row-major, then
    its position inside each nested 2x2 window from the coarsest level to the finest. After ``levels``
    2x2 merges of consecutive quadruples, the surviving tokens are in row-major order of the final grid,
    so no inverse permutation is needed at the end.

    Cached; always built outside inference mode, so an order first asked for under ``torch.inference_mode``
    (Lightning's validation, generation) stays usable by a later training step that saves it for backward.
    """
    with torch.inference_mode(False):
        return _window_major_order(height, width, levels)


@lru_cache(maxsize=256)
def _window_major_order(height: int, width: int, levels: int) -> torch.Tensor:
    step = 1 << levels
    if height % step or width % step:
        raise ValueError(f"grid {height}x{width} is not divisible by {step} ({levels} 2x2 compression steps)")
    i = torch.arange(height).view(-1, 1).expand(height, width)
    j = torch.arange(width).view(1, -1).expand(height, width)
    key = ((i >> levels) * (width >> levels) + (j >> levels)) * (WINDOW**levels)
    for level in range(levels):
        key = key + (((i >> level) & 1) * 2 + ((j >> level) & 1)) * (WINDOW**level)
    return torch.argsort(key.reshape(-1))


class WindowedTokenCompression(nn.Module):
    """Merges each 2x2 window of window-major tokens into one token.

    ``avg``: the window mean (parameter-free baseline).
    ``content_adaptive`` (the paper's choice): per-channel softmax weights over the four positions from
    ``W2 GELU(W1 [x_j ; mean]) + b2``; W2 and b2 start at zero so step 0 is exact average pooling while
    W1 keeps its random init, which lets the gate's gradient be non-zero from the first backward.
    ``pixel_unshuffle``: concat 4C -> LayerNorm -> Linear(4C, 4C) -> GELU -> Linear(4C, C).
    """

    def __init__(self, dim: int, pooling: str = "content_adaptive") -> None:
        super().__init__()
        if pooling not in POOLING_KINDS:
            raise ValueError(f"unknown WTC pooling {pooling!r}; choose one of {POOLING_KINDS}")
        self.dim = dim
        self.pooling = pooling
        if pooling == "content_adaptive":
            self.fc1 = nn.Linear(2 * dim, dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(dim, dim)
        elif pooling == "pixel_unshuffle":
            self.norm = nn.LayerNorm(WINDOW * dim)
            self.fc1 = nn.Linear(WINDOW * dim, WINDOW * dim)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(WINDOW * dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.pooling == "content_adaptive":
            nn.init.trunc_normal_(self.fc1.weight, std=0.02)
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        elif self.pooling == "pixel_unshuffle":
            for fc in (self.fc1, self.fc2):
                nn.init.trunc_normal_(fc.weight, std=0.02)
                nn.init.zeros_(fc.bias)

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """[..., N, C] window-major -> [..., N/4, 4, C]."""
        if x.shape[-2] % WINDOW:
            raise ValueError(f"token count {x.shape[-2]} is not a multiple of {WINDOW}")
        return x.view(*x.shape[:-2], x.shape[-2] // WINDOW, WINDOW, x.shape[-1])

    def gate_weights(self, windows: torch.Tensor) -> torch.Tensor:
        """Content-adaptive per-channel weights over the 4 window positions: [..., 4, C], summing to 1."""
        mean = windows.mean(dim=-2, keepdim=True).expand_as(windows)
        logits = self.fc2(self.act(self.fc1(torch.cat([windows, mean], dim=-1))))
        return logits.softmax(dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.windows(x)
        if self.pooling == "avg":
            return w.sum(dim=-2) * (1.0 / WINDOW)
        if self.pooling == "content_adaptive":
            return (self.gate_weights(w) * w).sum(dim=-2)
        flat = w.flatten(-2)
        return self.fc2(self.act(self.fc1(self.norm(flat))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pooling={self.pooling!r}"


def average_pool_windows(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free 2x2 average of window-major tokens (the reference content-adaptive starts from)."""
    return x.view(*x.shape[:-2], x.shape[-2] // WINDOW, WINDOW, x.shape[-1]).sum(dim=-2) * (1.0 / WINDOW)


def naive_resize_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Plain bicubic interpolation of the kernel: the baseline RPE's pseudo-inverse is measured against."""
    scale = (weight.shape[-1] / patch_size) ** 2  # keep the response to a constant image unchanged
    return F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False) * scale
