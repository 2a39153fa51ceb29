"""The data module's settings: range checks, shard specs per split, generated (``synthetic:``) shards, and the
end-of-epoch check that training really had data.

Functions of the module's hyperparameters (``UHDDataModule.hparams``), so the checks are cheap, need no
shard to be read, and can run before the trainer writes anything. Every failure is one
:class:`~llava_uhd.errors.SettingsError` naming the ``data.<setting>`` (a
:class:`~llava_uhd.errors.DataError` when the data itself fails the end-of-epoch check).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from datamodules.shards import SYNTHETIC_PREFIX, parse_synthetic, resolve_shards, synthetic_dir
from datamodules.writer import replacing_dir
from llava_uhd.errors import DataError, SettingsError

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
POSITIVE = ("batch_token_budget", "max_batch_size", "max_length", "pixels_per_token", "max_image_pixels")

log = logging.getLogger(__name__)


def check_settings(hp: Mapping[str, Any], stage: str, generated: bool = False) -> None:
    """Fail on settings out of range and, for the splits ``stage`` reads, on a shard spec that matches nothing
    or names a missing local shard; ``generated``: also require the ``synthetic:`` specs' shards to exist."""
    if hp["synthetic"] is not None:
        raise SettingsError("data.synthetic: generated data is asked for by name in the shard spec, e.g. "
                            "--data.train_shards 'synthetic:shapegrid,n=64,seed=0'; set data.synthetic to null")
    if not 0 <= hp["max_skip_fraction"] <= 1:
        raise SettingsError(f"data.max_skip_fraction: a share between 0 and 1, got {hp['max_skip_fraction']}")
    for name in POSITIVE:
        if hp[name] <= 0:
            raise SettingsError(f"data.{name}: must be positive, got {hp[name]}")
    if hp["num_workers"] < 0:
        raise SettingsError(f"data.num_workers: must be 0 or more, got {hp['num_workers']}")
    if hp["sample_shuffle"] < 0:
        raise SettingsError(f"data.sample_shuffle: a buffer of 0 (off) or more samples, got {hp['sample_shuffle']}")
    for name in ("batches_per_epoch", "eval_batches"):
        if hp.get(name) is not None and hp[name] <= 0:
            raise SettingsError(f"data.{name}: must be positive (or null), got {hp[name]}")
    for split in STAGE_SPLITS.get(stage, ()):
        key, spec = f"data.{split}_shards", hp.get(f"{split}_shards")
        if spec is None:
            if split == "val" and hp.get("val_tsv"):  # a benchmark TSV is the val set (datamodules.tsv)
                continue
            if split == {"fit": "train", "validate": "val"}.get(stage, "test"):
                raise SettingsError(f"{key}: {stage} needs shards (a folder, brace pattern, .tar, list, or "
                                    "'synthetic:TASK,n=N')")
            continue
        resolve_shards(spec, key, hp["synthetic_root"], generated=generated)


def shard_key(hp: Mapping[str, Any], spec: object) -> str:
    """The ``data.<split>_shards`` setting that holds ``spec`` (for messages)."""
    return next((f"data.{split}_shards" for split in SPLITS if hp.get(f"{split}_shards") is spec), "data shards")


def generate_synthetic(hp: Mapping[str, Any]) -> None:
    """Write the shards of every ``synthetic:`` spec that has not been generated yet, into
    ``synthetic_root/<task>-<settings>`` (atomically: a folder appears only complete)."""
    from datamodules.synthetic import write_synthetic

    for split in SPLITS:
        spec = hp.get(f"{split}_shards")
        items = [spec] if isinstance(spec, str) else spec if isinstance(spec, list) else []
        for item in items:
            if not (isinstance(item, str) and item.strip().startswith(SYNTHETIC_PREFIX)):
                continue
            key = f"data.{split}_shards"
            out = synthetic_dir(item.strip(), hp["synthetic_root"], key)
            if os.path.isdir(out):
                continue
            settings = parse_synthetic(item.strip(), key)
            try:
                with replacing_dir(out, option="data.synthetic_root") as staging:
                    index = write_synthetic(out=staging, **settings)
            except ValueError as exn:
                raise SettingsError(f"{key}: {item!r}: {exn}") from exn
            log.info("generated %s for %s in %s (%d shards)", item, key, out, len(index["shards"]))


def check_training_data(hp: Mapping[str, Any], used: int, skipped: dict[str, int]) -> None:
    """Fail a training epoch that used no sample, or skipped more than ``max_skip_fraction`` of them, with a
    :class:`~llava_uhd.errors.DataError`. ``epoch_overflow`` (surplus batches dropped to keep ranks equal) is not
    a data fault and not counted."""
    bad = {k: v for k, v in sorted(skipped.items()) if v and k != "epoch_overflow"}
    total = sum(bad.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in bad.items()) or "none"
    spec, limit = hp["train_shards"], hp["max_skip_fraction"]
    if used == 0:
        counted = f"skipped {total}: {reasons}" if total else "the loader delivered no batch to count skips by"
        raise DataError(f"data.train_shards: no usable training sample in {spec!r} ({counted}); nothing "
                        "was trained")
    share = total / (used + total)
    if share > limit:
        raise DataError(f"data.train_shards: {total} of {used + total} samples skipped ({share:.0%} > "
                        f"data.max_skip_fraction {limit:.0%}): {reasons}")
