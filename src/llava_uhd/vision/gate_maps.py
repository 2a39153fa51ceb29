"""Gate maps of the content-adaptive WTC: the numbers (one weight per token, row-major) and their picture.

A content-adaptive WTC weights the four tokens of each 2x2 window per channel (softmax over the window, so the
four weights sum to 1; average pooling is 1/4 each). The map shown for a WTC layer is, for every token entering
it, its gate weight averaged over channels, on that layer's token grid in row-major order: a token above 1/4
counts more than its window's average, one below counts less.

Two places draw these maps and both use this module, so the training monitor (``callbacks.WTCGateMonitor``,
TensorBoard) and the web demo (``python -m llava_uhd.app``) show the same thing: :func:`gate_weight_map` turns a
WTC's window-major input into the map, :func:`draw_gate_maps` lays the maps over the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from .pvc import WINDOW, WindowedTokenCompression, window_major_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AVERAGE_WEIGHT = 1.0 / WINDOW
"""Every gate weight under average pooling (and at initialisation: the gate's last layer starts at zero)."""


def gate_weight_map(wtc: WindowedTokenCompression, tokens: torch.Tensor, grid: tuple[int, int],
                    levels_left: int) -> torch.Tensor:
    """Channel-mean gate weight of every token of one image entering ``wtc``, as a row-major [h, w] map (CPU).

    ``tokens``: the image's tokens in the encoder's window-major order, [h * w, C] (a longer pack is cut to the
    first ``h * w``, so a packed batch's first image works as is); ``grid``: (h, w) at this layer;
    ``levels_left``: 2x2 compressions still to come including this one (they fix the window-major order)."""
    h, w = grid
    weights = wtc.gate_weights(wtc.windows(tokens[: h * w])).float().mean(dim=-1).flatten()  # window-major
    order = window_major_order(h, w, levels_left).to(weights.device)
    grid_map = torch.empty_like(weights)
    grid_map[order] = weights
    return grid_map.view(h, w).cpu()


def display_pixels(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] pixels as an [H, W, 3] float array in [0, 1] for display: uint8 scaled, normalised stretched."""
    image = pixels.detach().float().cpu()
    if pixels.dtype == torch.uint8:
        image = image / 255.0
    else:  # normalised pixels: stretch back to [0, 1]
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
    return image.permute(1, 2, 0).numpy()


def map_spread(maps: Mapping[str, torch.Tensor]) -> float:
    """Half-width of the shared colour scale around 1/4: the largest deviation, at least 0.05 (so average
    pooling shows as one flat colour, not as amplified rounding noise)."""
    deviations = [float((m.float() - AVERAGE_WEIGHT).abs().max()) for m in maps.values() if m.numel()]
    return max([0.05, *deviations])


def draw_gate_maps(pixels: torch.Tensor, maps: Mapping[str, torch.Tensor], panel_width: float = 3.5,
                   titles: Mapping[str, str] | None = None, input_title: str | None = None) -> Figure:
    """The image, then one panel per map laid over it (blue below 1/4, white at 1/4, red above; one scale for all).

    ``maps``: label -> [h, w] gate weights (:func:`gate_weight_map`); ``titles``: label -> panel title (default
    ``"<label> gate weight (h, w)"``). The colour data of panel ``i + 1`` is ``maps``' ``i``-th map, unscaled."""
    from matplotlib.figure import Figure

    image = display_pixels(pixels)
    height, width = image.shape[:2]
    panels = 1 + len(maps)
    figure = Figure(figsize=(panel_width * panels, panel_width * height / width + 0.6))
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title(input_title or f"input {height}x{width}", fontsize=8)
    spread = map_spread(maps)
    for ax, (label, grid) in zip(axes[1:], maps.items()):
        ax.imshow(image)
        shown = ax.imshow(grid.float().numpy(), cmap="coolwarm", vmin=AVERAGE_WEIGHT - spread,
                          vmax=AVERAGE_WEIGHT + spread, alpha=0.6, extent=(0, width, height, 0),
                          interpolation="nearest")
        title = (titles or {}).get(label, f"{label} gate weight {tuple(grid.shape)}")
        ax.set_title(title, fontsize=8)
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_axis_off()
    figure.tight_layout()
    return figure


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure (no pyplot state involved, so safe from several threads)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
