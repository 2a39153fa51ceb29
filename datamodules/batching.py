"""Aspect-ratio buckets under a visual-token budget, the packed alternative, collation, and batch counting.

Bucket mode: a sample goes to the bucket of its image grid, ``(n_images, H, W)`` after the resolution
policy, so a batch holds a single grid shape and ``pixel_values`` is one dense ``[N, 3, H, W]`` tensor.
A bucket is emitted when it holds ``capacity = min(max_batch_size, budget // tokens_per_sample)`` samples
(at least one): the budget counts visual tokens, so big images make small batches. Multi-image samples
whose images differ in size share a ``mixed`` bucket filled next-fit like the packed mode. Buckets live in
each worker; partial buckets are flushed when the stream ends, so no sample is lost.

Packed mode: one next-fit buffer of mixed sizes under the same budget; ``pixel_values`` is a list.

The bucketer reads only ``sample.image_sizes``, so a resumed stream can replay it on placeholders that carry
sizes read from image headers (see ``datamodules.stream_state``).

Because bucket-mode capacities do not depend on the order of the stream, :func:`count_batches` can
predict from image sizes alone exactly how many batches a stream of samples makes (used to give every
rank the same number of batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence

from datamodules.samples import Sample
from llava_uhd.conversation import IGNORE_INDEX

MIXED = "mixed"


def bucket_key(image_sizes: list[tuple[int, int]]) -> tuple | str:
    if len(set(image_sizes)) > 1:
        return MIXED
    h, w = image_sizes[0] if image_sizes else (0, 0)
    return (len(image_sizes), h, w)


class Bucketer:
    """Groups samples into batches (lists of samples) under a visual-token budget."""

    def __init__(
        self,
        image_token_fn: Callable[[int, int], int],
        batch_token_budget: int,
        max_batch_size: int,
        packed: bool = False,
    ) -> None:
        if batch_token_budget <= 0 or max_batch_size <= 0:
            raise ValueError("batch_token_budget and max_batch_size must be positive")
        self.image_token_fn, self.budget, self.max_batch_size, self.packed = (
            image_token_fn, batch_token_budget, max_batch_size, packed)

    def tokens(self, image_sizes: list[tuple[int, int]]) -> int:
        return sum(self.image_token_fn(h, w) for h, w in image_sizes)

    def capacity(self, tokens_per_sample: int) -> int:
        return max(1, min(self.max_batch_size, self.budget // max(tokens_per_sample, 1)))

    def key(self, image_sizes: list[tuple[int, int]]) -> tuple | str:
        return MIXED if self.packed else bucket_key(image_sizes)

    def __call__(self, samples: Iterable[Sample]) -> Iterator[list[Sample]]:
        buckets: dict[object, list] = {}
        loads: dict[object, int] = {}
        for sample in samples:
            sizes = sample.image_sizes
            key, tokens = self.key(sizes), self.tokens(sizes)
            bucket = buckets.setdefault(key, [])
            if key == MIXED and bucket and (loads[key] + tokens > self.budget or len(bucket) >= self.max_batch_size):
                yield bucket
                bucket = buckets[key] = []
            bucket.append(sample)
            loads[key] = (loads.get(key, 0) if len(bucket) > 1 else 0) + tokens
            if key != MIXED and len(bucket) >= self.capacity(tokens):
                yield bucket
                buckets[key] = []
        for bucket in buckets.values():  # end of stream: flush partial buckets
            if bucket:
                yield bucket

    def count_batches(self, samples_image_sizes: Iterable[list[tuple[int, int]]]) -> int:
        """Number of batches ``__call__`` makes from samples with these (already policy-resized) image sizes.

        Exact for uniform buckets whatever the order; next-fit in the given order for ``mixed``/packed.
        """
        counts: dict[object, int] = {}
        mixed_batches, load, size = 0, 0, 0
        for sizes in samples_image_sizes:
            key, tokens = self.key(sizes), self.tokens(sizes)
            if key != MIXED:
                counts[key] = counts.get(key, 0) + 1
                continue
            if size and (load + tokens > self.budget or size >= self.max_batch_size):
                mixed_batches, load, size = mixed_batches + 1, 0, 0
            load, size = load + tokens, size + 1
        total = mixed_batches + (1 if size else 0)
        for (n_images, h, w), n in counts.items():
            total += math.ceil(n / self.capacity(self.tokens([(h, w)] * n_images)))
        return total


def _right_padded(rows: list[list[int]], value: int) -> torch.Tensor:
    return pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=value)


def collate(samples: list[Sample], pad_token_id: int) -> dict:
    """Right-padded token tensors, pixels (one tensor for a single grid shape, else a list), metadata."""
    input_ids = _right_padded([s.input_ids for s in samples], pad_token_id)
    labels = _right_padded([s.labels for s in samples], IGNORE_INDEX)
    attention_mask = _right_padded([[1] * len(s.input_ids) for s in samples], 0)
    images = [p for s in samples for p in s.pixel_values]
    image_sizes = [tuple(p.shape[-2:]) for p in images]
    if not images:
        pixel_values = torch.zeros(0, 3, 0, 0)
    elif len(set(image_sizes)) == 1:
        pixel_values = torch.stack(images)
    else:
        pixel_values = images
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_sizes": image_sizes,
        "images_per_sample": [len(s.pixel_values) for s in samples],
        "keys": [s.key for s in samples],
        "orig_sizes": [size for s in samples for size in s.orig_sizes],
        "meta": [s.meta for s in samples],
    }
