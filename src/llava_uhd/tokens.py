"""How many LLM positions one image takes: the interface every vision encoder offers, and its picklable counter.

Every encoder kind (ViT-UHD / GNE in :mod:`llava_uhd.vision.vit_uhd`, SBE in :mod:`llava_uhd.vision.slicing`)
answers the same three questions, always for a given projector (the projector's 2x2 merge changes the count):

- ``encoder.num_image_tokens(height, width, projector) -> int``: positions of a preprocessed image;
- ``encoder.policy(projector, min_pixels, max_pixels, max_side, name)``: the resolution policy that
  ``preprocess`` resizes with (the SBE's slice grid takes none of the limits);
- ``encoder.token_counter(projector) -> ImageTokenCounter``: the same count as a small frozen object that
  crosses into data-loader worker processes without the model.

This module imports nothing from the project, so encoders, the model and the data pipeline can all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


def views_per_image(rows: int, cols: int) -> int:
    """SBE views of a ``rows x cols`` slice grid: thumbnail plus slices; a 1x1 grid is a single view."""
    return 1 if rows * cols == 1 else rows * cols + 1


@dataclass(frozen=True)
class ImageTokenCounter:
    """LLM positions of one preprocessed image, as a small picklable object for data-loader workers."""

    pixels_per_token: int
    """Native-resolution encoders: pixels per LLM token side (encoder reduction x projector merge)."""
    slice_size: int = 0
    """SBE: slice side in pixels (0 for native-resolution encoders)."""
    tokens_per_view: int = 0
    """SBE: LLM tokens of one slice or thumbnail."""

    def __call__(self, height: int, width: int) -> int:
        if not self.slice_size:
            return (height // self.pixels_per_token) * (width // self.pixels_per_token)
        rows, cols = height // self.slice_size, width // self.slice_size
        separators = 0 if rows * cols == 1 else rows * cols  # one <|row_sep|> per row, <|slice_sep|> between slices
        return views_per_image(rows, cols) * self.tokens_per_view + separators


class TokenCountingEncoder(Protocol):
    """What :class:`llava_uhd.mllm.LlavaUHD` asks of its vision encoder to count and size images."""

    embed_dim: int
    reduction: int

    def num_image_tokens(self, height: int, width: int, projector: Any) -> int: ...

    def policy(self, projector: Any, min_pixels: int = ..., max_pixels: int = ..., max_side: int = ...,
               name: str = ...) -> Any: ...

    def token_counter(self, projector: Any) -> ImageTokenCounter: ...
