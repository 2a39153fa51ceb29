"""Two gloo ranks on CPU: disjoint samples, equal batch counts, every sample once per epoch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.datamodule import UHDDataModule
from datamodules.synthetic import write_synthetic
from llava_uhd.tokenizer import build_tiny_tokenizer

from .conftest import SMALL, good_samples, write_shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, tok_dir, runs, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, (specs, num_workers) in runs.items():
            dm = UHDDataModule(train_shards=specs, tokenizer_path=tok_dir, batch_token_budget=256, max_batch_size=4,
                               **{**SMALL, "num_workers": num_workers, "sample_shuffle": 8})
            loader = dm.train_dataloader()
            epochs = []
            for _ in range(2):
                keys = [b["keys"] for b in loader]
                steps = torch.tensor([len(keys)])
                dist.all_reduce(steps)  # a rank with fewer batches would hang a real DDP step here
                epochs.append(keys)
            results[(name, rank)] = {"epochs": epochs, "len": len(loader)}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both scenarios in one 2-process launch (process start-up dominates the cost)."""
    tmp = tmp_path_factory.mktemp("ddp")
    # 56 samples in shards of 12, 12, 12, 12, 8: the ranks cannot get equal shard counts
    write_synthetic("shapegrid", 56, str(tmp / "uneven"), seed=0, min_side=64, max_side=256, shard_size=12)
    write_shards(tmp / "balanced", good_samples(32), shard_size=8)  # one bucket, 4 per batch: 4 batches a rank
    tok_dir = str(tmp / "tok")
    build_tiny_tokenizer(tok_dir)
    runs = {"uneven": (str(tmp / "uneven"), 2), "balanced": (str(tmp / "balanced"), 0)}
    results = mp.Manager().dict()
    # fork: the children inherit the imported modules (spawn re-imports torch, lightning, transformers: ~20 s)
    mp.start_processes(_rank, args=(2, _free_port(), tok_dir, runs, results), nprocs=2, join=True,
                       start_method="fork")
    return dict(results)


@pytest.mark.distributed
def test_two_ranks_disjoint_equal_and_complete(ranks):
    r0, r1 = ranks[("uneven", 0)], ranks[("uneven", 1)]
    everything = {f"shapegrid{i:08d}" for i in range(56)}
    for epoch in range(2):
        b0, b1 = r0["epochs"][epoch], r1["epochs"][epoch]
        assert len(b0) == len(b1) == r0["len"] == r1["len"]
        k0, k1 = [k for b in b0 for k in b], [k for b in b1 for k in b]
        assert not set(k0) & set(k1)  # disjoint
        assert set(k0) | set(k1) == everything  # every sample at least once (repeats only as padding)
        if len(k0) + len(k1) == 56:  # counts already equal: exactly once
            assert len(set(k0)) == len(k0) and len(set(k1)) == len(k1)


@pytest.mark.distributed
def test_balanced_shards_give_every_sample_exactly_once(ranks):
    r0, r1 = ranks[("balanced", 0)], ranks[("balanced", 1)]
    for epoch in range(2):
        k0 = [k for b in r0["epochs"][epoch] for k in b]
        k1 = [k for b in r1["epochs"][epoch] for k in b]
        assert len(r0["epochs"][epoch]) == len(r1["epochs"][epoch]) == r0["len"] == 4
        assert sorted(k0 + k1) == [f"s{i:04d}" for i in range(32)]
        assert r0["epochs"][0] != r0["epochs"][1] or epoch == 0  # reshuffled between epochs
