"""Writing a shard set: :class:`ShardSetWriter` (shards, ``index.json``, ``skipped.jsonl``) and
:func:`replacing_dir` (a whole set written beside its target and swapped in on success).

The index format is described in :mod:`datamodules.shards`, which reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import webdataset as wds

from llava_uhd.atomic import exchange_paths
from llava_uhd.errors import SettingsError

INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.jsonl"


class ShardSetWriter:
    """Writes samples (dicts of bytes) into ``out/prefix-%06d.tar`` shards and the index on close."""

    def __init__(self, out: str, shard_size: int = 1000, prefix: str = "shard") -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out, self.shard_size, self.prefix = out, shard_size, prefix
        os.makedirs(out, exist_ok=True)
        self.shards: list[dict] = []
        self.skipped: Counter = Counter()
        self.skipped_samples: list[dict] = []  # {"id", "reason", "detail"}, written to skipped.jsonl
        self._writer = None
        self._stream = None

    def write(self, sample: dict, image_sizes: list[tuple[int, int]]) -> None:
        if "." in sample["__key__"] or "/" in sample["__key__"]:
            raise ValueError(f"keys may not contain '.' or '/': {sample['__key__']!r}")
        if len(sample) < 2:  # a tar holds members, not keys: the index would count a sample that is not there
            raise ValueError(f"sample {sample['__key__']!r} has no members")
        if self._writer is None or self.shards[-1]["samples"] >= self.shard_size:
            self._next_shard()
        self._writer.write(sample)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["image_sizes"].append([list(s) for s in image_sizes])

    def skip(self, reason: str, sample_id: object = None, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_samples.append({"id": sample_id, "reason": reason, "detail": detail[:500]})

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
        with open(os.path.join(self.out, SKIPPED_NAME), "w", encoding="utf-8") as f:
            for entry in self.skipped_samples:
                f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        return index

    @property
    def written(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def report(self, out: str | None = None, examples: int = 3, listed: bool = True) -> str:
        """Console summary: counts, skip reasons, and the first few skipped ids per reason."""
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [f"converted {self.written} samples into {len(self.shards)} shards in {out or self.out}; "
                 f"skipped {sum(self.skipped.values())} ({reasons})"]
        for reason in sorted(self.skipped):
            entries = [e for e in self.skipped_samples if e["reason"] == reason]
            shown = ", ".join(repr(e["id"]) for e in entries[:examples]) + (" ..." if len(entries) > examples else "")
            lines.append(f"  {reason}: {shown}  ({entries[0]['detail'][:100]})")
        if self.skipped and listed:
            lines.append(f"  every skipped sample with its reason: {os.path.join(out or self.out, SKIPPED_NAME)}")
        return "\n".join(lines)


@contextmanager
def replacing_dir(out: str, overwrite: bool = False, option: str = "--out") -> Iterator[str]:
    """A temporary sibling folder to write a whole shard set into; on success it takes ``out``'s place.

    ``out`` must be missing or empty unless ``overwrite``. The old set is swapped for the new one with renames
    (an atomic exchange where the OS has one), so a crash leaves the old set or the new one, never a mix; on
    an error the temporary folder is removed and ``out`` is untouched.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SettingsError(f"{option}: {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise SettingsError(f"{option}: {out} is not empty (it may hold another shard set); pass --overwrite to "
                            "replace it, or choose a new folder")
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    except OSError as exn:
        raise SettingsError(f"{option}: cannot create a folder beside {out}: {exn}") from exn
    try:
        yield staging
        if not os.path.isdir(out):
            os.rename(staging, out)
        elif exchange_paths(staging, out):
            shutil.rmtree(staging)  # now the old set
        else:
            old = staging + ".old"
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
