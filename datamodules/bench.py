"""Loader throughput: decode + resize + bucket + collate of 1024x1024 JPEGs, with 0 and 2 workers.

    python -m datamodules.bench [--n 256] [--workers 0 2]

Writes photo-like JPEGs (shapes + noise, quality 90) to a temp dir, then times full epochs of
``UHDDataModule.train_dataloader()`` with the paper's resolution policy (1024^2 -> 1040^2, 40 px per
token). "per worker" divides by the number of processes doing the work (1 for ``num_workers=0``).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from datamodules.datamodule import UHDDataModule
from datamodules.shards import ShardSetWriter
from llava_uhd.tokenizer import build_tiny_tokenizer


def _photo(rng: np.random.Generator, size: int) -> bytes:
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        (x, y), r = rng.integers(0, size, 2), int(rng.integers(20, size // 5))
        draw.ellipse([x, y, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    noise = rng.integers(-12, 12, (size, size, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_bench_shards(out: str, n: int, size: int = 1024, distinct: int = 16) -> None:
    rng = np.random.default_rng(0)
    images = [_photo(rng, size) for _ in range(distinct)]
    writer = ShardSetWriter(out, shard_size=max(1, n // 8), prefix="bench")
    record = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                {"from": "gpt", "value": "Coloured discs on a noisy background."}]}
    for i in range(n):
        writer.write({"__key__": f"img{i:06d}", "jpg": images[i % distinct],
                      "json": json.dumps(record).encode()}, [(size, size)])
    writer.close()


def run(shards: str, tokenizer_dir: str, num_workers: int, epochs: int = 2) -> tuple[float, int]:
    dm = UHDDataModule(train_shards=shards, tokenizer_path=tokenizer_dir, num_workers=num_workers,
                       pin_memory=False, sample_shuffle=64, batch_token_budget=8 * 676, max_batch_size=8)
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch: worker start-up, tokenizer load, page cache
        pass
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in tqdm(loader, desc=f"num_workers={num_workers}", leave=False):
            images += len(batch["image_sizes"])
    return images / (time.perf_counter() - start), len(batch["image_sizes"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_shards(f"{tmp}/shards", args.n, args.size)
        build_tiny_tokenizer(f"{tmp}/tok")
        rows = []
        for workers in args.workers:
            rate, batch_size = run(f"{tmp}/shards", f"{tmp}/tok", workers)
            rows.append((workers, batch_size, rate, rate / max(1, workers)))
    print(f"\n{args.size}x{args.size} JPEG -> decode + resize + bucket + collate, {args.n} images x 2 epochs")
    print(f"{'num_workers':>11} | {'batch':>5} | {'images/s':>8} | {'per worker':>10}")
    print("-" * 44)
    for workers, batch_size, rate, per_worker in rows:
        print(f"{workers:>11} | {batch_size:>5} | {rate:>8.1f} | {per_worker:>10.1f}")


if __name__ == "__main__":
    main()
