"""Loader throughput (decode + resize + bucket + collate of 1024x1024 JPEGs, with 0 and 2 workers) and what the
checkpointed stream position costs.

    python -m datamodules.bench [--n 256] [--workers 0 2]

Writes photo-like JPEGs (shapes + noise, quality 90) to a temp dir, then times full epochs of
``UHDDataModule.train_dataloader()`` with the paper's resolution policy (1024^2 -> 1040^2, 40 px per
token). "per worker" divides by the number of processes doing the work (1 for ``num_workers=0``).

Stream state: the size and save time of a checkpoint with and without the DataModule's stream position
(taken half-way through an epoch; the weights are a stand-in 16 MB state dict, since only the difference
matters), and how long a resumed loader takes to its first batch (replaying the consumed half from image
headers), against a fresh epoch's first batch and the time the full pipeline took to make that half.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from datamodules.datamodule import UHDDataModule
from datamodules.writer import ShardSetWriter
from llava_uhd.profiling import median_ms
from llava_uhd.tokenizer import build_tiny_tokenizer


def _photo(rng: np.random.Generator, size: int) -> bytes:
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        (x, y), r = rng.integers(0, size, 2), int(rng.integers(min(20, size // 10), size // 5))  # 20..size/5
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


def _save(checkpoint: dict, path: str, repeats: int = 5) -> tuple[int, float]:
    """File size and median wall time (s) of ``torch.save``."""
    seconds = median_ms(lambda: torch.save(checkpoint, path), repeats=repeats, warmup=0) / 1e3
    return os.path.getsize(path), seconds


def stream_state_cost(shards: str, tokenizer_dir: str, tmp: str, num_workers: int = 0) -> dict:
    """Checkpoint size/time with and without the stream position half-way through an epoch; replay time."""
    def loader():
        return UHDDataModule(train_shards=shards, tokenizer_path=tokenizer_dir, num_workers=num_workers,
                             pin_memory=False, sample_shuffle=64, batch_token_budget=8 * 676,
                             max_batch_size=8).train_dataloader()

    first = loader()
    half = len(first) // 2
    start = time.perf_counter()
    for i, batch in enumerate(first):
        first.consume(batch)
        if i + 1 == half:
            break
    made = time.perf_counter() - start
    start = time.perf_counter()
    state = first.stream_state()
    state_s = time.perf_counter() - start
    weights = {"state_dict": {f"w{i}": torch.zeros(1024, 1024, dtype=torch.float32) for i in range(4)}}
    plain = _save(weights, f"{tmp}/plain.ckpt")
    with_state = _save({**weights, "UHDDataModule": {"train_stream": state}}, f"{tmp}/stream.ckpt")
    fresh = loader()
    start = time.perf_counter()
    next(iter(fresh))
    first_batch = time.perf_counter() - start
    resumed = loader()
    resumed.load_stream_state(state)
    start = time.perf_counter()
    next(iter(resumed))
    replay = time.perf_counter() - start
    return {"plain": plain, "stream": with_state, "state_s": state_s, "half": half, "made": made, "replay": replay,
            "first_batch": first_batch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    if args.n < 32:
        parser.error(f"--n: at least 32 images (4 batches of 8, so that half an epoch can be resumed), got {args.n}")
    if args.size < 64:
        parser.error(f"--size: at least 64 pixels, got {args.size}")
    if any(w < 0 for w in args.workers):
        parser.error(f"--workers: counts of 0 or more, got {args.workers}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers forked after tokenizer use: no warning
    with tempfile.TemporaryDirectory() as tmp:
        write_bench_shards(f"{tmp}/shards", args.n, args.size)
        build_tiny_tokenizer(f"{tmp}/tok")
        rows = []
        for workers in args.workers:
            rate, batch_size = run(f"{tmp}/shards", f"{tmp}/tok", workers)
            rows.append((workers, batch_size, rate, rate / max(1, workers)))
        cost = stream_state_cost(f"{tmp}/shards", f"{tmp}/tok", tmp)
    print(f"\n{args.size}x{args.size} JPEG -> decode + resize + bucket + collate, {args.n} images x 2 epochs")
    print(f"{'num_workers':>11} | {'batch':>5} | {'images/s':>8} | {'per worker':>10}")
    print("-" * 44)
    for workers, batch_size, rate, per_worker in rows:
        print(f"{workers:>11} | {batch_size:>5} | {rate:>8.1f} | {per_worker:>10.1f}")
    (plain_b, plain_s), (stream_b, stream_s) = cost["plain"], cost["stream"]
    print(f"\ncheckpoint without stream state: {plain_b} B, saved in {plain_s * 1e3:.1f} ms; with stream state: "
          f"{stream_b} B (+{stream_b - plain_b} B), saved in {stream_s * 1e3:.1f} ms "
          f"(+{cost['state_s'] * 1e3:.2f} ms to take the state)")
    print(f"resume half-way ({cost['half']} batches consumed, made by the full pipeline in {cost['made']:.2f} s): "
          f"first batch after {cost['replay']:.2f} s (a fresh epoch's first batch: {cost['first_batch']:.2f} s)")


if __name__ == "__main__":
    main()
