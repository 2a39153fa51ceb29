"""What a page or API client sends, checked before the model sees it: image files and the question.

An upload is read once into memory and checked with the data pipeline's own image checks
(:func:`datamodules.samples.open_image`: header read first, pixel count and aspect ratio limited before any
pixel is decoded, so a decompression bomb costs nothing), then decoded in full once so a truncated or damaged
file is refused here rather than halfway through an answer. Every refusal is an :class:`InputError` whose
message the page shows; the app keeps serving.

The model later decodes the kept bytes again through ``LlavaUHD.preprocess`` (:meth:`Upload.open` gives a fresh,
undecoded image), so the pixels it sees are exactly those of ``model.generate(Image.open(path), ...)``.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datamodules.samples import MAX_ASPECT_RATIO, SampleError, open_image
from llava_uhd.conversation import IMAGE_PLACEHOLDER

MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
              "TIFF": "image/tiff"}


class InputError(ValueError):
    """Bad input from a page or API client (a file, the question, a setting): shown as one message, never fatal."""


@dataclass(frozen=True)
class Limits:
    """What one request may send. Gradio also refuses uploads past ``max_file_mb`` before they reach the app."""

    max_file_mb: float = 20.0
    """Largest image file, in MB."""
    max_image_pixels: int = 50_000_000
    """Largest image area the header may claim (a 12 MP phone photo is 12e6); larger is refused undecoded."""
    max_aspect_ratio: float = MAX_ASPECT_RATIO
    """Longest side over shortest side (a 1x5000 strip is refused), as in training."""
    max_images: int = 8
    """Images per conversation."""
    max_question_chars: int = 4000
    """Characters in one question."""

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)


@dataclass(frozen=True)
class Upload:
    """One checked image: its bytes (what the model and an API server are given), name, format and size."""

    name: str
    data: bytes
    format: str
    height: int
    width: int
    path: str = ""
    """Where the server keeps the uploaded file (Gradio's cache), for showing it again."""

    @property
    def digest(self) -> str:
        """Content hash: the same picture uploaded again continues the same conversation."""
        return hashlib.sha256(self.data).hexdigest()[:16]

    @property
    def mime_type(self) -> str:
        return MIME_TYPES.get(self.format, "application/octet-stream")

    def open(self) -> Image.Image:
        """A fresh, undecoded PIL image of the bytes (the model's preprocessing decodes it, as from a file)."""
        return Image.open(io.BytesIO(self.data))


def read_upload(path: str | os.PathLike, limits: Limits, name: str | None = None) -> Upload:
    """Read and check one uploaded file; :class:`InputError` names the file and what is wrong with it."""
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise InputError(f"{name}: {size / 1e6:.1f} MB, over the {limits.max_file_mb:g} MB limit for one image")
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{name}: cannot read the uploaded file ({err.strerror or err})") from err
    return check_image_bytes(data, name, limits, str(path))


def check_image_bytes(data: bytes, name: str, limits: Limits, path: str = "") -> Upload:
    """Header checks (format, pixel count, aspect ratio), then one full decode; the checked :class:`Upload`."""
    try:
        image = open_image(data, limits.max_image_pixels, limits.max_aspect_ratio)
    except SampleError as err:
        raise InputError(f"{name}: {_reason(err, limits)}") from err
    width, height = image.size
    try:
        image.load()  # a truncated or damaged file fails here, not in the middle of an answer
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for damaged data
        raise InputError(f"{name}: the image data is damaged or cut short and cannot be decoded ({err})") from err
    finally:
        image.close()
    return Upload(name, data, image.format or "", height, width, path)


def _reason(err: SampleError, limits: Limits) -> str:
    """The data pipeline's skip reason, said for someone uploading a file."""
    if err.reason == "decompression_bomb":
        return (f"the image claims more pixels than the {limits.max_image_pixels / 1e6:g} megapixel limit "
                f"({err.detail}); refused without decoding")
    if err.reason == "extreme_aspect":
        return f"the image is {err.detail} pixels, longer than {limits.max_aspect_ratio:g}:1"
    if "identify" in err.detail or "0 bytes" in err.detail:
        return "not an image file (JPEG, PNG, WebP, GIF, BMP or TIFF)"
    return f"cannot read the image ({err.detail})"


def read_uploads(paths: list | None, limits: Limits) -> list[Upload]:
    """Every file of a request, checked in order (the first bad one is reported)."""
    paths = [p for p in (paths or []) if p]
    if len(paths) > limits.max_images:
        raise InputError(f"{len(paths)} images: at most {limits.max_images} per conversation")
    return [read_upload(_path_of(p), limits) for p in paths]


def _path_of(item) -> str:
    """A file as Gradio hands it over: a path, or a dict / object with a path (gradio_client's FileData)."""
    if isinstance(item, dict):
        item = item.get("path") or item.get("name") or ""
    path = getattr(item, "path", None) or getattr(item, "name", None) or item
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise InputError(f"expected an uploaded image file, got {type(item).__name__}")
    return str(path)


def check_question(question: object, limits: Limits) -> str:
    """The question as sent, or :class:`InputError` (empty, too long, or not text)."""
    if not isinstance(question, str):
        raise InputError(f"the question must be text, got {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InputError("the question is empty: type a question about the image")
    if len(text) > limits.max_question_chars:
        raise InputError(f"the question is {len(text)} characters long; at most {limits.max_question_chars}")
    if IMAGE_PLACEHOLDER in text:
        raise InputError(f"the question may not contain {IMAGE_PLACEHOLDER}: the uploaded images are placed for you")
    return text
