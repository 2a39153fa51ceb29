"""Streaming webdataset data for LLaVA-UHD: DataModule, aspect-ratio buckets, converters, synthetic data."""

from datamodules.batching import Bucketer, collate
from datamodules.datamodule import GridTokens, ShardStream, StreamLoader, UHDDataModule
from datamodules.samples import SKIP_REASONS, SampleDecoder, SampleError, SkipCounter, check_sample
from datamodules.shards import ShardSetWriter, expand_shards, load_shard_infos, resolve_shards, split_shards
from datamodules.synthetic import make_sample, write_synthetic

__all__ = [
    "SKIP_REASONS",
    "Bucketer",
    "GridTokens",
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
