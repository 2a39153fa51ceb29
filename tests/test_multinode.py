"""Two "nodes" on localhost: ``torchrun --nnodes 2 --node_rank {0,1}`` (one process each, gloo, CPU) runs
``src/main.py fit`` with ``--trainer.num_nodes 2``, saves a checkpoint, and a second launch of both nodes resumes
from it with ``--ckpt_path last``: the multi-machine launch of docs/scaling.md, on one host."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.utils.distributed import get_free_port

from .helpers.app import CONFIGS, MAIN, ROOT, app_args, app_env, checkpoint_dir, probe, saved_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch_two_nodes(args: list[str], run_dir: Path, tag: str, timeout: float = 300) -> list[str]:
    """Start both nodes' torchrun agents (static rendezvous on a free port) and wait for both; their logs."""
    port = get_free_port()
    procs, logs = [], []
    for node_rank in (0, 1):
        log = run_dir / f"{tag}_node{node_rank}.log"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   str(MAIN), *args]
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=app_env(1), stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(t[-4000:] for t in texts)
    return texts


@pytest.fixture(scope="module")
def two_node_run(app_data, tmp_path_factory) -> Path:
    data = app_data
    run_dir = tmp_path_factory.mktemp("multinode")
    nodes = ("-c", str(CONFIGS / "ddp.yaml"), "--trainer.devices", "1", "--trainer.num_nodes", "2")
    launch_two_nodes(app_args(data, run_dir, 4, 2, *nodes), run_dir, "first")
    (run_dir / "probe").rename(run_dir / "first")
    texts = launch_two_nodes(app_args(data, run_dir, 6, 2, *nodes, "--ckpt_path", "last"), run_dir, "resumed")
    (run_dir / "probe").rename(run_dir / "resumed")
    assert any("resuming from" in t for t in texts)
    return run_dir


def test_two_nodes_train_as_one_world_and_checkpoint(two_node_run):
    first = [probe(two_node_run, rank, "first") for rank in (0, 1)]
    assert [p["world_size"] for p in first] == [2, 2]
    assert [p["end_step"] for p in first] == [4, 4]
    assert first[0]["digest"] == first[1]["digest"]  # DDP across the nodes: identical replicas
    assert saved_step(checkpoint_dir(two_node_run) / "epoch=0-step=4.ckpt") == 4


def test_two_nodes_resume_from_the_saved_step(two_node_run):
    resumed = [probe(two_node_run, rank, "resumed") for rank in (0, 1)]
    assert [p["start_step"] for p in resumed] == [4, 4]  # continued, not restarted
    assert [p["end_step"] for p in resumed] == [6, 6]
    assert resumed[0]["digest"] == resumed[1]["digest"]
    assert saved_step(checkpoint_dir(two_node_run) / "last.ckpt") == 6
