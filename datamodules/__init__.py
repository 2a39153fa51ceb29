"""Streaming webdataset data for LLaVA-UHD: DataModule, aspect-ratio buckets, converters, synthetic data."""

from datamodules.batching import Bucketer, collate
from datamodules.datamodule import UHDDataModule
from datamodules.samples import SKIP_REASONS, SampleDecoder, SampleError, SkipCounter, check_sample
from datamodules.shards import expand_shards, load_shard_infos, resolve_shards, split_shards
from datamodules.stream import ShardStream, StreamLoader
from datamodules.writer import ShardSetWriter

__all__ = [
    "SKIP_REASONS",
    "Bucketer",
    "SampleDecoder",
    "SampleError",
    "ShardSetWriter",
    "ShardStream",
    "SkipCounter",
    "StreamLoader",
    "UHDDataModule",
    "check_sample",
    "collate",
    "expand_shards",
    "load_shard_infos",
    "make_sample",
    "resolve_shards",
    "split_shards",
    "write_synthetic",
]


def __getattr__(name: str):
    """``make_sample`` / ``write_synthetic`` are imported on first use, so that ``python -m datamodules.synthetic``
    runs its module only once (no runpy warning)."""
    if name in ("make_sample", "write_synthetic"):
        from datamodules import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
