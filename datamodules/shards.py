"""The shard index, shard specs, and the deterministic split of shards over ranks and workers.

Every writer (:class:`datamodules.writer.ShardSetWriter`: converters, synthetic data) puts an ``index.json``
next to its shards, and ``skipped.jsonl`` (one ``{"id", "reason", "detail"}`` per sample it did not write)::

    {"version": 1, "shards": [{"name": "shard-000000.tar", "samples": 8,
                               "image_sizes": [[[h, w]], [[h, w], [h, w]], []]}], "skipped": {...}}

``samples`` lets the loader balance shards over ranks by sample count; ``image_sizes`` (original sizes of
each sample's images) lets it compute, before reading any pixels, how many batches each rank will make,
which is how every rank is given the same number of batches (see ``datamodules.stream``).

A whole set is written through :func:`datamodules.writer.replacing_dir` (a temporary sibling swapped in on
success), and a shard spec becomes urls through :func:`resolve_shards`, which turns every mistake in it into one
:class:`~llava_uhd.errors.SettingsError` naming the setting.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import random
from dataclasses import dataclass, field
from urllib.parse import urlparse

import webdataset as wds

from datamodules.writer import INDEX_NAME
from llava_uhd.errors import SettingsError

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
SYNTHETIC_PREFIX = "synthetic:"


def expand_shards(spec: str | list[str] | None) -> list[str]:
    """Brace lists (``dir/shard-{000000..000009}.tar``), ``::``-joined lists, plain lists, or a
    directory (all its ``*.tar``), local or any URL webdataset's gopen can open. No checks: see
    :func:`resolve_shards`."""
    if spec is None:
        return []
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = []
    for item in specs:
        if isinstance(item, str) and os.path.isdir(item):
            urls += sorted(os.path.join(item, n) for n in os.listdir(item) if n.endswith(SHARD_SUFFIXES))
        else:
            urls += wds.shardlists.expand_urls(item)
    return urls


def parse_synthetic(spec: str, key: str = "data.train_shards") -> dict:
    """``synthetic:shapegrid,n=64,seed=0,min_side=64`` -> keyword arguments of ``write_synthetic`` (no ``out``)."""
    import inspect

    from datamodules.synthetic import TASKS, write_synthetic

    task, *pairs = spec.removeprefix(SYNTHETIC_PREFIX).split(",")
    if task not in TASKS:
        raise SettingsError(f"{key}: {spec!r}: unknown synthetic task {task!r}; tasks are {', '.join(TASKS)} "
                            "(e.g. 'synthetic:shapegrid,n=64')")
    allowed = [p for p in inspect.signature(write_synthetic).parameters if p not in ("task", "out")]
    settings: dict = {"task": task}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or name not in allowed:
            raise SettingsError(f"{key}: {spec!r}: expected name=value with names {', '.join(allowed)}, got {pair!r}")
        try:
            settings[name] = int(value)
        except ValueError as exn:
            raise SettingsError(f"{key}: {spec!r}: {name} must be an integer, got {value!r}") from exn
    if "n" not in settings or settings["n"] <= 0:
        raise SettingsError(f"{key}: {spec!r}: give a positive sample count, e.g. 'synthetic:{task},n=64'")
    return settings


def synthetic_dir(spec: str, root: str, key: str = "data.train_shards") -> str:
    """The folder a ``synthetic:`` spec is generated into: one per distinct setting, under ``root``."""
    settings = parse_synthetic(spec, key)
    name = settings.pop("task") + "".join(f"-{k}{v}" for k, v in sorted(settings.items()))
    return os.path.join(root, name)


def _is_remote(item: str) -> bool:
    return urlparse(item).scheme not in ("", "file") or item.startswith("pipe:")


def _local_shards(item: str, key: str, check: bool) -> list[str]:
    path = item.removeprefix("file://")
    if path.lower().endswith((".json", ".jsonl")):
        raise SettingsError(f"{key}: {item!r} is a JSON file, not shards; convert it first: "
                            "python -m datamodules.convert llava --json FILE --images DIR --out DIR")
    if os.path.isdir(path):
        urls = expand_shards(path)
        if not urls:
            hint = ""
            if any(n.lower().endswith((".json", ".jsonl")) for n in os.listdir(path)):
                hint = " (it holds JSON: convert it with python -m datamodules.convert)"
            raise SettingsError(f"{key}: the folder {path!r} holds no .tar shards{hint}")
        return urls
    urls = wds.shardlists.expand_urls(path)
    if not check:
        return urls
    missing = [u for u in urls if not os.path.isfile(u)]
    if len(missing) == len(urls):
        pattern = len(urls) > 1 or "{" in path
        what = f"the pattern {path!r} matches no file" if pattern else f"no such file or folder: {path!r}"
        raise SettingsError(f"{key}: {what}")
    if missing:
        raise SettingsError(f"{key}: {len(missing)} of the {len(urls)} shards of {path!r} do not exist "
                            f"(first: {missing[0]})")
    wrong = [u for u in urls if not u.endswith(SHARD_SUFFIXES)]
    if wrong:
        raise SettingsError(f"{key}: {wrong[0]!r} is not a .tar shard (accepted: a folder of shards, a brace "
                            "pattern, a .tar file, a list of these, or 'synthetic:TASK,n=N')")
    return urls


def resolve_shards(
    spec: str | list[str] | None, key: str = "data.train_shards", synthetic_root: str = "data/synthetic",
    check: bool = True, generated: bool = True,
) -> list[str]:
    """Shard urls of a spec, or a :class:`SettingsError` naming ``key``. Forms: a folder of shards, a brace
    pattern, a single ``.tar``, a list of these, a remote URL, or ``synthetic:TASK,n=N,...`` (generated data,
    only ever when asked for by that name; see :func:`synthetic_dir`). With ``check``, every local shard must
    exist (a missing one is an error here, not a skip at read time); with ``generated``, so must the folder of
    a ``synthetic:`` spec (without, only its settings are checked and no url is returned for it)."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else spec
    if not isinstance(items, list | tuple) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise SettingsError(f"{key}: expected a shard spec (a string) or a non-empty list of them, got {spec!r}")
    urls = []
    for item in items:
        item = item.strip()
        if item.startswith(SYNTHETIC_PREFIX):
            path = synthetic_dir(item, synthetic_root, key)
            if not generated:
                continue
            if not os.path.isdir(path):
                raise SettingsError(f"{key}: {item!r} has not been generated into {path} yet (the DataModule's "
                                    "prepare_data does that)")
            urls += expand_shards(path)
        elif _is_remote(item):
            urls += wds.shardlists.expand_urls(item)
        else:
            urls += _local_shards(item, key, check)
    return urls


def _read_index(directory: str) -> dict | None:
    path = posixpath.join(directory, INDEX_NAME) if urlparse(directory).scheme else os.path.join(directory, INDEX_NAME)
    try:
        if urlparse(path).scheme in ("", "file"):
            with open(urlparse(path).path, "rb") as f:
                return json.load(f)
        with wds.gopen(path, "rb") as f:
            return json.load(io.TextIOWrapper(f))
    except FileNotFoundError:  # no index: the loader falls back to unbalanced splits
        return None
    except Exception as exn:  # an index that is there but unreadable is worth a word: the same fallback
        log.warning("ignoring the shard index %s (%s: %s); shards are split without sample counts", path,
                    type(exn).__name__, exn)
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
