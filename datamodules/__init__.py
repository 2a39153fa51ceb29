"""Streaming webdataset data for LLaVA-UHD: DataModule, aspect-ratio buckets, converters, synthetic data."""

from datamodules.batching import Bucketer, collate
from datamodules.datamodule import UHDDataModule
from datamodules.samples import SKIP_REASONS, SampleDecoder, SampleError, SkipCounter, check_sample
from datamodules.shards import ShardSetWriter, expand_shards, load_shard_infos, resolve_shards, split_shards
from datamodules.stream import ShardStream, StreamLoader
from datamodules.synthetic import make_sample, write_synthetic

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
    """Deprecated names, each with a ``DeprecationWarning`` (``GridTokens``: ``llava_uhd.tokens.ImageTokenCounter``)."""
    if name == "GridTokens":
        from datamodules import datamodule

        return datamodule.GridTokens
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
