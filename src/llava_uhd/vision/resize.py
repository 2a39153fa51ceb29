"""Resolution policy and the one image preprocessing path.

LLaVA-UHD v3 encodes each image at (close to) its native resolution: the aspect ratio is kept, the
area is clamped to a pixel budget, the longest side is capped, and each side is snapped to the
multiple the encoder needs (patch size x 2 per 2x2 compression step). Every consumer (data module,
CLI, generation, benchmarks) goes through :func:`preprocess`, so training and inference see the
same pixels.

Two rules, chosen by name (:func:`make_policy`):

- ``default`` (:class:`ResolutionPolicy`): the product's rule for its own models; the size closest in aspect
  ratio, then area, within the budget; resized with torchvision's antialiased bicubic uint8 kernel.
- ``release`` (:class:`ReleaseResolutionPolicy`): the released LLaVA-UHD v3's training rule (upscale by 1.4,
  clamp the area, cap the side, floor to the multiple), resized with PIL's bicubic as the release does, so a
  released model sees the pixels it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ResolutionPolicy:
    """Where an image of a given size is resized to before encoding."""

    min_pixels: int = 512 * 512
    """Smaller images are upscaled to at least this area (aspect ratio kept)."""
    max_pixels: int = 1560 * 1560
    """Larger images are downscaled to at most this area."""
    max_side: int = 5120
    """Cap on the longest side; wins over ``min_pixels`` for extreme aspect ratios."""
    multiple: int = 40
    """Each output side is a multiple of this (patch x 2^steps, e.g. 10 x 2 x 2 = 40)."""

    def __post_init__(self) -> None:
        if self.multiple <= 0:
            raise ValueError(f"multiple must be positive, got {self.multiple}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_side < self.multiple:
            raise ValueError(f"max_side {self.max_side} is smaller than the multiple {self.multiple}")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) to resize an image of ``height x width`` to."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        area = height * width
        scale = 1.0
        if area < self.min_pixels:
            scale = math.sqrt(self.min_pixels / area)
        elif area > self.max_pixels:
            scale = math.sqrt(self.max_pixels / area)
        scale = min(scale, self.max_side / max(height, width))
        target_area = height * width * scale * scale
        aspect = height / width
        m = self.multiple
        cap = self.max_side // m * m
        # Candidates around the scaled size; keep the valid one closest in aspect ratio, then in area.
        candidates = []
        for h in {min(cap, max(m, round(height * scale / m) * m + k * m)) for k in (-1, 0, 1)}:
            for w in {min(cap, max(m, round(h / aspect / m) * m + k * m)) for k in (-1, 0, 1)}:
                candidates.append((h, w))
        valid = [(h, w) for h, w in candidates if self.min_pixels <= h * w <= self.max_pixels]
        if not valid:  # extreme aspect ratio: max_side forbids reaching min_pixels; take the largest that fits
            fits = [c for c in candidates if c[0] * c[1] <= self.max_pixels]
            if not fits:  # the short side is at one multiple already: shorten the long side to the area budget
                fits = [(max(m, min(h, self.max_pixels // w // m * m)), w) if h >= w
                        else (h, max(m, min(w, self.max_pixels // h // m * m))) for h, w in candidates]
            valid = [max(fits, key=lambda c: (c[0] * c[1] <= self.max_pixels, c[0] * c[1]))]
        return min(
            valid, key=lambda hw: (round(abs(math.log(hw[0] / hw[1] / aspect)), 3), abs(hw[0] * hw[1] - target_area))
        )


@dataclass(frozen=True)
class ReleaseResolutionPolicy:
    """The released model's resize rule (training, ``--resolution 1560``), sides floored to ``multiple``.

    1. ``W * H <= max_pixels``: scale both sides by ``upscale`` (1.4) first;
    2. area above ``max_pixels`` (below ``min_pixels``): ``H = int(S / sqrt(W / H))``, ``W = int(H * W / H)``
       with ``S = sqrt(max_pixels)`` (``sqrt(min_pixels)``);
    3. longest side above ``max_side``: scaled down to it (int);
    4. each side floored to a multiple of ``multiple`` (at least one multiple).
    """

    min_pixels: int = 512 * 512
    max_pixels: int = 1560 * 1560
    max_side: int = 5120
    multiple: int = 40
    upscale: float = 1.4
    resample: str = "pil"
    """Resize with PIL's ``Image.resize(..., BICUBIC)``, as the release does."""

    def __post_init__(self) -> None:
        if self.multiple <= 0:
            raise ValueError(f"multiple must be positive, got {self.multiple}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.upscale <= 0:
            raise ValueError(f"upscale must be positive, got {self.upscale}")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) to resize an image of ``height x width`` to."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        w, h = float(width), float(height)
        if w * h <= self.max_pixels:
            w, h = w * self.upscale, h * self.upscale
        ratio = w / h
        for limit, outside in ((self.max_pixels, w * h > self.max_pixels), (self.min_pixels, w * h < self.min_pixels)):
            if outside:
                h = int(math.sqrt(limit) / math.sqrt(ratio))
                w = int(h * ratio)
        if max(w, h) > self.max_side:
            scale = self.max_side / max(w, h)
            w, h = int(w * scale), int(h * scale)
        m = self.multiple
        return max(m, int(h) // m * m), max(m, int(w) // m * m)


POLICIES = ("default", "release")


def make_policy(
    name: str, multiple: int, min_pixels: int = 512 * 512, max_pixels: int = 1560 * 1560, max_side: int = 5120
) -> ResolutionPolicy | ReleaseResolutionPolicy:
    """Resolution policy by name: ``default`` (the product's) or ``release`` (the released model's rule)."""
    if name == "default":
        return ResolutionPolicy(min_pixels=min_pixels, max_pixels=max_pixels, max_side=max_side, multiple=multiple)
    if name == "release":
        return ReleaseResolutionPolicy(min_pixels=min_pixels, max_pixels=max_pixels, max_side=max_side,
                                       multiple=multiple)
    raise ValueError(f"unknown resolution policy {name!r}; choose one of {POLICIES}")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: palette, grey, alpha (composited on white), CMYK, 16-bit and float."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        if image.mode.startswith("I;16") or (image.mode == "I" and hi > 255):
            array = array / 65535.0 * 255.0 if hi > 255 else array
        elif image.mode == "F" and hi <= 1.0 and lo >= 0.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 tensor [3, H, W]."""
    return TF.pil_to_tensor(image)


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of uint8 pixels [3, h, w] to (height, width).

    torchvision's uint8 kernel: the same filter as PIL's bicubic (within 2 levels) at a fraction of the cost.
    """
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return TF.resize(pixels, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def normalize(pixels: torch.Tensor, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 ``(x / 255 - mean) / std`` per channel, in one buffer."""
    return TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), list(mean), list(std), inplace=True)


EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation (1-8; 1 = as stored) from what the header holds, never decoding pixels: a PNG whose eXIf
    chunk comes after the image data, or an unreadable EXIF block, counts as 1."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PIL would decode the whole image to look for a late eXIf chunk
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is not a reason to drop the photo
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of ``image`` as it is shown, i.e. after its EXIF orientation, read from the header alone.

    Every size the product records (converter index, loader buckets, resume replay) is this one, so the pixels
    :func:`preprocess` makes and the token counts planned from headers agree for a rotated phone photo too."""
    if exif_orientation(image) in _TRANSPOSED:
        return image.width, image.height
    return image.height, image.width


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a phone photo upright, as viewers show it); as is otherwise."""
    if exif_orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def preprocess(
    image: Image.Image,
    policy: ResolutionPolicy | ReleaseResolutionPolicy,
    mean=SIGLIP_MEAN,
    std=SIGLIP_STD,
    normalized: bool = True,
) -> torch.Tensor:
    """The one preprocessing path: EXIF orientation, RGB conversion, policy size, bicubic resize, normalise.

    ``normalized=False`` stops before normalising and returns uint8 pixels: the data pipeline batches
    those (4x less to stack and to pass between processes) and normalises whole batches.
    """
    height, width = upright_size(image)
    target = policy.target_size(height, width)
    if getattr(policy, "resample", None) == "pil":  # the release's path: full decode, PIL bicubic
        image = to_rgb(upright(image))
        if (image.height, image.width) != target:
            image = image.resize((target[1], target[0]), Image.BICUBIC)
        pixels = to_tensor(image)
        return normalize(pixels, mean, std) if normalized else pixels
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        # Still undecoded: let libjpeg decode at a reduced DCT scale (never below the target) when
        # shrinking 2x or more; big photographs then decode several times faster.
        turned = (height, width) != (image.height, image.width)
        image.draft(image.mode, (target[0], target[1]) if turned else (target[1], target[0]))
    pixels = resize(to_tensor(to_rgb(upright(image))), target)
    return normalize(pixels, mean, std) if normalized else pixels
