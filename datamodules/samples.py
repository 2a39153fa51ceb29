"""Raw webdataset samples -> model-ready samples, and the counted reasons for the ones that are skipped.

A shard sample is a group of tar members sharing a key: ``key.jpg`` (or ``.png``/``.webp``/``.jpeg``), or
``key.0.jpg``, ``key.1.png``, ... for several images, plus ``key.json`` (LLaVA-style: ``{"conversations":
[...], "meta": {...}}`` or a bare list of turns) or ``key.txt`` (a caption, turned into a one-turn
conversation with ``caption_prompt``). Images are decoded by PIL from bytes and JSON by ``json.loads``:
webdataset's own decoders (which include pickle) are never used.

Nothing is dropped silently: every failure is a :class:`SampleError` whose ``reason`` the
:class:`SkipCounter` counts.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image, UnidentifiedImageError

from llava_uhd.conversation import (
    DEFAULT_SYSTEM,
    IMAGE_PLACEHOLDER,
    ConversationError,
    normalize_turns,
    tokenize_conversation,
    training_dialogue,
)
from llava_uhd.vision.resize import ResolutionPolicy, preprocess, upright_size

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default limit
MAX_ASPECT_RATIO = 50.0
_IMAGE_MEMBER = re.compile(r"^(?:(\d+)\.)?(jpg|jpeg|png|webp)$")

SKIP_REASONS = {
    "corrupt_image": "image bytes PIL cannot decode (corrupt or truncated)",
    "missing_image": "the conversation refers to more images than the sample holds",
    "decompression_bomb": "image header claims more pixels than max_image_pixels",
    "extreme_aspect": "aspect ratio beyond max_aspect_ratio (e.g. a 1x5000 strip)",
    "bad_json": "json member that is not valid UTF-8 JSON",
    "no_text": "neither a json conversation nor a txt caption",
    "empty": "empty conversation or turn",
    "malformed": "conversation with wrong roles, order or types",
    "image_count_mismatch": "number of <image> placeholders differs from the number of images",
    "too_long": "does not fit max_length even after dropping text-only trailing turns",
    "missing_shard": "shard that does not exist or cannot be opened",
    "truncated_shard": "shard that ends in the middle of a tar member",
    "shard_error": "any other error while reading a shard",
    "epoch_overflow": "samples beyond the fixed batches-per-epoch of a rank (see the DataModule docs)",
}


class SampleError(Exception):
    """A sample that is skipped; ``reason`` is a key of :data:`SKIP_REASONS`, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str = "") -> None:
        detail = detail.removeprefix(f"{reason}: ")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Counts skipped samples by reason. ``pop_new()`` returns the counts since its last call: the stream
    attaches them to each batch (``batch["skips"]``) so counts made in worker processes reach the trainer."""

    def __init__(self) -> None:
        self.total: Counter = Counter()
        self._new: Counter = Counter()
        self._last_truncated: str | None = None

    named_per_reason = 5  # skips named in a warning per reason and process; the rest at DEBUG level
    UNNAMED = ("epoch_overflow", "missing_shard", "truncated_shard", "shard_error")  # handler warns for shards

    def add(self, reason: str, n: int = 1, detail: str = "") -> None:
        self.total[reason] += n
        self._new[reason] += n
        if reason not in self.UNNAMED and self.total[reason] - n < self.named_per_reason:
            more = " (further ones at DEBUG level)" if self.total[reason] >= self.named_per_reason else ""
            log.warning("skipped %s: %s%s", reason, detail[:300], more)
        else:
            log.debug("skipped %d sample(s): %s %s", n, reason, detail)

    def update(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.total[reason] += n

    def pop_new(self) -> dict[str, int]:
        new, self._new = dict(self._new), Counter()
        return new

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.total.items()))

    def handler(self, exn: Exception) -> bool:
        """webdataset ``handler``: count shard-level errors and carry on with the next shard."""
        text = " ".join(str(a) for a in exn.args)
        if isinstance(exn, FileNotFoundError | IsADirectoryError | PermissionError) or "No such file" in text:
            reason = "missing_shard"
        elif "unexpected end of data" in text or "truncated" in text or isinstance(exn, EOFError):
            reason = "truncated_shard"
            # webdataset reports a truncated shard twice (member read, then tar iteration): count it once
            shard = re.search(r"name='([^']+)'", text)
            shard = shard.group(1) if shard else text
            if shard == self._last_truncated:
                return True
            self._last_truncated = shard
        else:
            reason = "shard_error"
        self.add(reason, detail=text)
        log.warning("skipping shard data (%s): %s", reason, text[:200])
        return True


@dataclass
class Sample:
    key: str
    pixel_values: list[torch.Tensor]
    orig_sizes: list[tuple[int, int]]
    input_ids: list[int]
    labels: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [tuple(p.shape[-2:]) for p in self.pixel_values]


def image_members(sample: dict) -> list[bytes]:
    """Image bytes in order: ``jpg`` alone, or ``0.jpg``, ``1.png``, ... by index."""
    found = []
    for name, value in sample.items():
        match = _IMAGE_MEMBER.match(name.lower())
        if match:
            found.append((int(match.group(1)) if match.group(1) is not None else -1, value))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


def open_image(data: bytes, max_image_pixels: int, max_aspect_ratio: float) -> Image.Image:
    """PIL image from bytes, with the header checked before any pixel is decoded."""
    if not data:
        raise SampleError("corrupt_image", "empty image member (0 bytes)")
    try:
        with warnings.catch_warnings():  # the pixel limit is checked below, against max_image_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise SampleError("decompression_bomb", str(exn)) from exn
    except UnidentifiedImageError as exn:
        raise SampleError("corrupt_image", f"not an image format PIL can identify ({len(data)} bytes)") from exn
    except Exception as exn:
        raise SampleError("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
    width, height = image.size
    if width * height > max_image_pixels:
        raise SampleError("decompression_bomb", f"{width}x{height} > {max_image_pixels} pixels")
    if width <= 0 or height <= 0 or max(width, height) / min(width, height) > max_aspect_ratio:
        raise SampleError("extreme_aspect", f"{width}x{height}")
    return image


def _full_decode(image: Image.Image) -> Image.Image:
    image.load()
    return image


@dataclass
class CheckedSample:
    """What :func:`check_sample` found valid: the dialogue to train on, meta, and each image's original
    (h, w) and decoded form (a loaded PIL image, or whatever ``decode`` made of it)."""

    system: str | None
    dialogue: list[dict]
    meta: dict
    orig_sizes: list[tuple[int, int]]
    images: list


def check_sample(
    raw: dict,
    caption_prompt: str = "Describe the image briefly.",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    decode: Callable[[Image.Image], object] | None = None,
    system: str | None = DEFAULT_SYSTEM,
) -> CheckedSample:
    """The one validation path for a raw sample (``{"__key__", "jpg"/"0.png"/..., "json" or "txt"}``), used by
    the converter before it writes a sample and by the loader's :class:`SampleDecoder`: conversation rules
    (roles, order, placeholders vs images), header limits (pixels, aspect ratio) and a full decode of every
    image's data. ``decode`` (default ``Image.load``) turns each checked image into what the caller needs; any
    error it raises is a ``corrupt_image``. Raises :class:`SampleError` with the reason; only the token
    length (``too_long``), which needs the tokenizer, is checked later."""
    turns, meta, declared = _conversation(raw, caption_prompt)
    blobs = image_members(raw)
    try:
        turns = normalize_turns(turns)
        expected = declared if declared is not None else sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
        if expected > len(blobs):
            raise SampleError("missing_image", f"{expected} images expected, {len(blobs)} found")
        system, dialogue = training_dialogue(turns, len(blobs), system)
    except ConversationError as exn:
        raise SampleError(exn.reason, str(exn)) from exn
    decode = decode or _full_decode
    orig_sizes, images = [], []
    for blob in blobs:
        if not isinstance(blob, bytes | bytearray):
            raise SampleError("corrupt_image", f"image member of type {type(blob).__name__}")
        image = open_image(blob, max_image_pixels, max_aspect_ratio)
        orig_sizes.append(upright_size(image))  # as shown (EXIF), as preprocess sizes it
        try:
            images.append(decode(image))
        except Exception as exn:  # truncated / corrupt data surfaces only when pixels are decoded
            raise SampleError("corrupt_image", f"{type(exn).__name__}: {exn}") from exn
    return CheckedSample(system, dialogue, meta, orig_sizes, images)


def _conversation(sample: dict, caption_prompt: str) -> tuple[list[dict], dict, int | None]:
    """Turns, meta and the declared number of images (None when the json does not say)."""
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (UnicodeDecodeError, ValueError, TypeError) as exn:
            raise SampleError("bad_json", str(exn)) from exn
        if isinstance(record, list):
            record = {"conversations": record}
        if not isinstance(record, dict) or "conversations" not in record:
            raise SampleError("malformed", "json without conversations")
        declared = None
        if isinstance(record.get("images"), list):
            declared = len(record["images"])
        elif isinstance(record.get("image"), str):
            declared = 1
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        return record["conversations"], dict(meta), declared
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except (UnicodeDecodeError, AttributeError) as exn:
            raise SampleError("bad_json", f"txt is not UTF-8 text: {exn}") from exn
        turns = [{"from": "human", "value": caption_prompt}, {"from": "gpt", "value": caption}]
        return turns, {"task": "caption", "question": caption_prompt, "answer": caption}, None
    members = sorted(k for k in sample if not k.startswith("__"))
    raise SampleError("no_text", f"no json or txt member beside {', '.join(members) or 'nothing'}")


@dataclass
class SampleDecoder:
    """Callable turning a raw webdataset sample into a :class:`Sample`; raises :class:`SampleError`.

    Validation is :func:`check_sample` (the converter's check), decoding each image straight to the
    policy's size (``preprocess``), then tokenisation."""

    tokenizer: object
    policy: ResolutionPolicy
    image_token_fn: Callable[[int, int], int]
    max_length: int = 4096
    caption_prompt: str = "Describe the image briefly."
    vision_markers: bool = False
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_aspect_ratio: float = MAX_ASPECT_RATIO

    def _decode(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.policy, normalized=False)

    def __call__(self, raw: dict) -> Sample:
        checked = check_sample(raw, self.caption_prompt, self.max_image_pixels, self.max_aspect_ratio, self._decode)
        pixel_values = checked.images
        counts = [self.image_token_fn(*p.shape[-2:]) for p in pixel_values]
        system_turn = [{"role": "system", "content": checked.system}] if checked.system is not None else []
        try:
            tokens = tokenize_conversation(system_turn + checked.dialogue, self.tokenizer, counts, self.max_length,
                                           vision_markers=self.vision_markers)
        except ConversationError as exn:
            raise SampleError(exn.reason, str(exn)) from exn
        meta, dialogue = checked.meta, checked.dialogue
        meta.setdefault("question", dialogue[0]["content"].replace(IMAGE_PLACEHOLDER, "").strip())
        if len(dialogue) > 1:
            meta.setdefault("answer", dialogue[1]["content"])
        return Sample(raw["__key__"], pixel_values, checked.orig_sizes, tokens.input_ids, tokens.labels, meta)


def decode_stream(samples, decoder: SampleDecoder, skips: SkipCounter):
    """Decode a raw sample stream, counting (never raising) per-sample failures."""
    for raw in samples:
        try:
            yield decoder(raw)
        except SampleError as exn:
            skips.add(exn.reason, detail=f"{raw.get('__key__')}: {exn.detail}")
