"""Shared helpers: image bytes in every mode and shard writing into a temp dir (the tiny tokenizer fixture is the
session one of ``tests/conftest.py``)."""

import io
import json
import struct
import zlib

import numpy as np
from PIL import Image

from datamodules.writer import ShardSetWriter

SMALL = dict(pixels_per_token=16, min_pixels=64 * 64, max_pixels=128 * 128, max_side=512, max_length=512,
             num_workers=0, pin_memory=False, sample_shuffle=0)


def image_bytes(h=64, w=96, mode="RGB", fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (no pixel data worth decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def conversation(question="<image>\nWhat is this?", answer="A test.", **extra) -> bytes:
    record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}
    return json.dumps(record).encode()


def write_shards(out, samples, shard_size=4, sizes=None) -> dict:
    """Write raw sample dicts; index sizes are read from the images when not given."""
    writer = ShardSetWriter(str(out), shard_size)
    for i, sample in enumerate(samples):
        if sizes is not None:
            image_sizes = sizes[i]
        else:
            image_sizes = []
            for name in sorted(k for k in sample if k.split(".")[-1] in ("jpg", "png", "webp")):
                try:
                    im = Image.open(io.BytesIO(sample[name]))
                    image_sizes.append((im.height, im.width))
                except Exception:
                    image_sizes.append((64, 64))
        writer.write(sample, image_sizes)
    return writer.close()


def good_samples(n, h=64, w=96, prefix="s"):
    return [{"__key__": f"{prefix}{i:04d}", "jpg": image_bytes(h, w, seed=i), "json": conversation()} for i in range(n)]
