"""Shard writing, the shard index, shard specs, and the deterministic split of shards over ranks and workers.

Every writer here (converters, synthetic data) puts an ``index.json`` next to its shards::

    {"version": 1, "shards": [{"name": "shard-000000.tar", "samples": 8,
                               "image_sizes": [[[h, w]], [[h, w], [h, w]], []]}], "skipped": {...}}

``samples`` lets the loader balance shards over ranks by sample count; ``image_sizes`` (original sizes of
each sample's images) lets it compute, before reading any pixels, how many batches each rank will make,
which is how every rank is given the same number of batches (see ``datamodules.datamodule``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import webdataset as wds

INDEX_NAME = "index.json"


class ShardSetWriter:
    """Writes samples (dicts of bytes) into ``out/prefix-%06d.tar`` shards and the index on close."""

    def __init__(self, out: str, shard_size: int = 1000, prefix: str = "shard") -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out, self.shard_size, self.prefix = out, shard_size, prefix
        os.makedirs(out, exist_ok=True)
        self.shards: list[dict] = []
        self.skipped: Counter = Counter()
        self._writer = None
        self._stream = None

    def write(self, sample: dict, image_sizes: list[tuple[int, int]]) -> None:
        if "." in sample["__key__"] or "/" in sample["__key__"]:
            raise ValueError(f"keys may not contain '.' or '/': {sample['__key__']!r}")
        if self._writer is None or self.shards[-1]["samples"] >= self.shard_size:
            self._next_shard()
        self._writer.write(sample)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["image_sizes"].append([list(s) for s in image_sizes])

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._stream = open(os.path.join(self.out, name), "wb")
        self._writer = wds.TarWriter(self._stream, encoder=False)
        self.shards.append({"name": name, "samples": 0, "image_sizes": []})

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self, **extra) -> dict:
        """Finish the last shard and write the index; returns it."""
        self._close_shard()
        index = {"version": 1, "shards": self.shards, "skipped": dict(self.skipped), **extra}
        with open(os.path.join(self.out, INDEX_NAME), "w") as f:
            json.dump(index, f)
        return index

    @property
    def written(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def report(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"converted {self.written} samples into {len(self.shards)} shards in {self.out}; " \
               f"skipped {sum(self.skipped.values())} ({reasons})"


def expand_shards(spec: str | list[str] | None) -> list[str]:
    """Brace lists (``dir/shard-{000000..000009}.tar``), ``::``-joined lists, plain lists, or a
    directory (all its ``*.tar``), local or any URL webdataset's gopen can open."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for item in specs:
        if isinstance(item, str) and os.path.isdir(item):
            urls += sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(".tar"))
        else:
            urls += wds.shardlists.expand_urls(item)
    return urls


def _read_index(directory: str) -> dict | None:
    path = posixpath.join(directory, INDEX_NAME) if urlparse(directory).scheme else os.path.join(directory, INDEX_NAME)
    try:
        if urlparse(path).scheme in ("", "file"):
            with open(urlparse(path).path, "rb") as f:
                return json.load(f)
        with wds.gopen(path, "rb") as f:
            return json.load(io.TextIOWrapper(f))
    except Exception:  # no index (or unreadable): the loader falls back to unbalanced splits
        return None


@dataclass
class ShardInfo:
    """What the index says about one shard; ``samples`` is None for shards without an index entry."""

    url: str
    samples: int | None = None
    image_sizes: list = field(default_factory=list)


def load_shard_infos(urls: list[str]) -> list[ShardInfo]:
    """One ShardInfo per url, filled from the ``index.json`` of each url's directory when there is one."""
    indices: dict[str, dict] = {}
    infos = []
    for url in urls:
        directory, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if directory not in indices:
            index = _read_index(directory) or {"shards": []}
            indices[directory] = {s["name"]: s for s in index.get("shards", [])}
        entry = indices[directory].get(name)
        if entry is None:
            infos.append(ShardInfo(url))
        else:
            infos.append(ShardInfo(url, entry["samples"], entry.get("image_sizes", [])))
    return infos


def _balanced(infos: list[ShardInfo], parts: int, rng: random.Random) -> list[list[ShardInfo]]:
    """Longest-first greedy assignment of shards to ``parts`` bins by sample count (shards of unknown
    size count as the mean). Deterministic for a given rng state, so every rank computes the same split."""
    known = [s.samples for s in infos if s.samples is not None]
    mean = sum(known) / len(known) if known else 1.0
    order = list(infos)
    rng.shuffle(order)  # ties broken differently each epoch
    order.sort(key=lambda s: -(s.samples if s.samples is not None else mean))
    bins: list[list[ShardInfo]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for shard in order:
        i = min(range(parts), key=lambda j: (loads[j], len(bins[j]), j))
        bins[i].append(shard)
        loads[i] += shard.samples if shard.samples is not None else mean
    return bins


def split_shards(
    infos: list[ShardInfo], rank: int, world_size: int, num_workers: int, seed: int
) -> list[list[ShardInfo]]:
    """Shards of every worker of ``rank``: split by node, then by worker, each balanced by sample count.

    The split depends only on the seed (not the epoch), so epoch lengths stay constant; the stream
    shuffles each worker's shard order every epoch.
    """
    per_rank = _balanced(infos, world_size, random.Random(f"{seed}"))[rank]
    return _balanced(per_rank, num_workers, random.Random(f"{seed}-{rank}"))
