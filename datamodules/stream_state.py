"""Where a training stream stands, as a checkpoint can hold it, and how a worker gets back there by replay.

A worker's stream is deterministic given (seed, epoch, rank, worker): the same shards in the same order, the
same shuffle-buffer draws, the same buckets. So its position is one number, the batches of it that *training
consumed* (counted in the main process when a batch reaches the LightningModule, not when a worker made or
the loader prefetched it), plus the ids of the samples its decoder skipped on the way (skips depend on
pixel data that replay does not decode). To resume, each worker runs its pipeline again with a light
decoder (:func:`replay_decode`: image headers only, no pixel decode, no tokenisation), drops the first
``batches`` batches, then carries on with the full decoder; samples read during the replay that land in
later batches (they were in a bucket or mid-batch at the checkpoint) are decoded then
(:func:`decode_pending`).
Tar reading and the sample shuffle buffer run as before, so the buffer's content and both random states are
rebuilt exactly rather than stored: the state stays a few numbers per worker.

Samples that a worker had read, or that the loader had prefetched, but that training had not consumed when
the checkpoint was taken are after the cut, so the resumed stream yields them again: none is lost.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from PIL import Image

from datamodules.samples import SampleDecoder, SampleError, SkipCounter, image_members
from llava_uhd.vision.resize import upright_size

log = logging.getLogger(__name__)

STATE_VERSION = 1
STREAM_TAG = "stream"  # batch entry naming the worker that made it; the DataModule pops it before the model


def sample_id(raw: dict) -> str:
    """Shard and key of a raw sample: keys are unique within a shard."""
    return f"{raw.get('__url__', '')}#{raw.get('__key__', '')}"


@dataclass
class Pending:
    """A sample seen during replay: only what the bucketer needs (its policy-sized image grid) and the raw
    record, decoded for real if it is still in a bucket when replay ends."""

    raw: dict
    image_sizes: list[tuple[int, int]]

    @property
    def key(self) -> str:
        return self.raw.get("__key__", "")


@dataclass
class Replay:
    """One worker's way back to its checkpointed position: batches to drop, ids its decoder skipped."""

    batches: int = 0
    skipped: set[str] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.batches > 0


class MutableSkips(SkipCounter):
    """The stream's skip counter, silent while replaying (those skips were counted before the checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.muted = False

    def add(self, reason: str, n: int = 1, detail: str = "") -> None:
        if not self.muted:
            super().add(reason, n, detail)


def header_sizes(raw: dict, decoder: SampleDecoder) -> list[tuple[int, int]]:
    """Policy-sized (h, w) of each image from its header alone, as :func:`preprocess` would size it."""
    sizes = []
    for blob in image_members(raw):
        with Image.open(io.BytesIO(blob)) as image:
            sizes.append(decoder.policy.target_size(*upright_size(image)))
    return sizes


def replay_decode(
    samples: Iterable[dict], decoder: SampleDecoder, skips: SkipCounter, replay: Replay, skipped_out: list[str],
) -> Iterator:
    """The decode stage: :class:`Pending` records while ``replay`` is active, decoded samples after.

    Real decoding appends the id of every sample it skips to ``skipped_out`` (the stream attaches them to its
    next batch, so that a checkpoint knows which samples to skip when replaying)."""
    for raw in samples:
        if replay.active:
            if sample_id(raw) in replay.skipped:
                continue
            try:
                yield Pending(raw, header_sizes(raw, decoder))
            except Exception as exn:  # skipped before the checkpoint, so cannot be in a replayed batch
                log.debug("replay: %s unreadable header (%s)", sample_id(raw), exn)
            continue
        try:
            yield decoder(raw)
        except SampleError as exn:
            skips.add(exn.reason, detail=f"{raw.get('__key__')}: {exn}")
            skipped_out.append(sample_id(raw))


def decode_pending(batch: list, decoder: SampleDecoder, skips: SkipCounter) -> list:
    """``batch`` with its :class:`Pending` samples (read during replay, batched after it) decoded for real."""
    out = []
    for sample in batch:
        if isinstance(sample, Pending):
            try:
                sample = decoder(sample.raw)
            except SampleError as exn:  # decoding is deterministic: only if the data changed under us
                skips.add(exn.reason, detail=f"{sample.key}: {exn}")
                log.warning("resume: %s no longer decodes (%s); it is skipped", sample.key, exn)
                continue
        out.append(sample)
    return out


# ---- main-process side --------------------------------------------------------------------------------------
SETTING_NAMES = {
    "shards": "data.train_shards",
    "world_size": "trainer.devices x trainer.num_nodes (the world size)",
    "num_workers": "data.num_workers",
    "seed": "data.seed",
    "batch_token_budget": "data.batch_token_budget",
    "max_batch_size": "data.max_batch_size",
    "packed": "data.packed",
    "sample_shuffle": "data.sample_shuffle",
    "shard_shuffle": "data.shard_shuffle",
    "resampled": "data.resampled",
    "batches_per_epoch": "data.batches_per_epoch",
    "resolution": "data.min_pixels / data.max_pixels / data.max_side (the resolution policy)",
    "max_length": "data.max_length",
}


NAMED_SHARDS = 5
"""Shards named per kind of difference in a refused resume's message; the rest are counted."""


def _named(names: list[str]) -> str:
    more = f" and {len(names) - NAMED_SHARDS} more" if len(names) > NAMED_SHARDS else ""
    return ", ".join(names[:NAMED_SHARDS]) + more


def shard_differences(saved: list | None, current: list | None) -> str:
    """What differs between two stream settings' ``shards`` lists (``[name, samples]`` each, in stream order):
    ``"1 added (c.tar), 1 removed (a.tar), 1 changed size (b.tar: 8 -> 6 samples)"``, or the same shards in
    another order."""
    was: dict[str, list] = {}
    now: dict[str, list] = {}
    for table, shards in ((was, saved or []), (now, current or [])):
        for name, samples in shards:
            table.setdefault(str(name), []).append(samples)
    added, removed, resized = [], [], []
    for name in dict.fromkeys([*was, *now]):  # first seen order
        before, after = was.get(name, []), now.get(name, [])
        common = min(len(before), len(after))
        added += [name] * (len(after) - common)
        removed += [name] * (len(before) - common)
        resized += [f"{name}: {a} -> {b} samples" for a, b in zip(sorted(before[:common], key=str),
                                                                  sorted(after[:common], key=str)) if a != b]
    parts = [f"{len(names)} {what} ({_named(names)})" for what, names in
             (("added", added), ("removed", removed), ("changed size", resized)) if names]
    return ", ".join(parts) or "the same shards in another order"


def mismatches(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between the settings a stream state was saved under and the current ones."""
    out = []
    for name, label in SETTING_NAMES.items():
        if saved.get(name) != current.get(name):
            was, now = saved.get(name), current.get(name)
            if name == "shards":
                was, now = (f"{len(was or [])} shards",
                            f"{len(now or [])} shards: {shard_differences(was, now)}")
            out.append(f"{label}: the checkpoint's stream was saved with {was}, this run has {now}")
    return out


def resume_problems(state: dict, settings: dict, rank: int, world_size: int) -> list[str]:
    """Why a loader with ``settings`` (on ``rank`` of ``world_size``) cannot continue the checkpoint's stream
    ``state``; empty when it can."""
    if state.get("version") != STATE_VERSION:
        return [f"ckpt_path: its data stream state has version {state.get('version')!r}, this version reads "
                f"{STATE_VERSION}"]
    problems = mismatches(state.get("settings", {}), settings)
    if not problems and len(state["ranks"]) <= rank:
        problems = [mismatches({"world_size": len(state["ranks"])}, {"world_size": world_size})[0]]
    return problems


def resume_refusal(problems: list[str]) -> str:
    """The message of a refused resume: the first problem and the two ways on."""
    return (f"{problems[0]}; resume with the checkpoint's data settings, or pass --data.allow_restart true to "
            "restart the epoch's data stream")


@dataclass
class Tally:
    """What training consumed of one rank's stream in the current epoch: batches and decoder skips per worker,
    and the skip counts those batches carried."""

    epoch: int = -1
    batches: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, list[str]] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)

    def consume(self, tag: dict, skips: dict[str, int]) -> None:
        worker = int(tag["worker"])
        self.batches[worker] = self.batches.get(worker, 0) + 1
        if tag.get("skipped"):
            self.skipped.setdefault(worker, []).extend(tag["skipped"])
        for reason, n in skips.items():
            self.skips[reason] = self.skips.get(reason, 0) + n

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": {str(w): n for w, n in self.batches.items()},
                "skipped": {str(w): list(ids) for w, ids in self.skipped.items()}, "skips": dict(self.skips)}

    @classmethod
    def from_dict(cls, state: dict) -> Tally:
        return cls(int(state["epoch"]), {int(w): int(n) for w, n in state["batches"].items()},
                   {int(w): list(ids) for w, ids in state["skipped"].items()}, dict(state.get("skips", {})))

    def replays(self) -> dict[int, Replay]:
        return {w: Replay(n, set(self.skipped.get(w, []))) for w, n in self.batches.items()}


def gather(obj: object) -> list:
    """``obj`` of every rank (all ranks call this together, as they do when Lightning saves a checkpoint)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
