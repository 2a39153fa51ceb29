"""Exact mid-epoch resume through the app: a one-epoch run is SIGKILLed a few steps after a checkpoint in the
middle of its epoch, resumed with ``--ckpt_path last``, and the keys of the samples trained (logged by
:class:`tests.helpers.probes.KeyLog`) show every sample of the epoch trained exactly once, counting from the
killed run only the batches up to its checkpoint. With 0 and 2 data-loader workers, with packed batches, and
under 2-process DDP. A checkpoint without stream state (an older version's) still resumes, with a warning that
the stream restarts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from datamodules import write_synthetic

from .helpers.app import CONFIGS, app_args, checkpoint_dir, run_app, saved_step, start_app
from .helpers.probes import HOLD_ENV, KEYLOG_ENV

pytestmark = pytest.mark.slow


def shards(tmp_path_factory, name: str, side: tuple[int, int]) -> Path:
    out = tmp_path_factory.getbasetemp() / f"exact_{name}"
    if not out.exists():
        write_synthetic("shapegrid", 32, str(out), seed=2, min_side=side[0], max_side=side[1], shard_size=8)
    return out


def launch(args: list[str], keylog: Path, log: Path, hold: int) -> subprocess.Popen:
    env = {KEYLOG_ENV: str(keylog), HOLD_ENV: str(hold)}
    return start_app(args, log, threads=1, env=env, new_session=True)


def logged(keylog: Path, rank: int = 0) -> list[dict]:
    path = keylog / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def kill_after_checkpoint(args: list[str], run_dir: Path, every: int, ranks: int) -> int:
    """Start the run, SIGKILL its process group once every rank has trained one step past its second
    checkpoint (where :class:`KeyLog` holds it); the saved step."""
    log = run_dir / "killed.log"
    hold = 2 * every + 1  # not a checkpoint step: the last checkpoint is the one before it
    proc = launch(args, run_dir / "keys_killed", log, hold)
    deadline = time.monotonic() + 240
    while True:
        ckpts = list((run_dir / "runs" / "stage2").glob(f"version_*/checkpoints/epoch=0-step={2 * every}.ckpt"))
        steps = [max((r["step"] for r in logged(run_dir / "keys_killed", rank)), default=0) for rank in range(ranks)]
        if ckpts and min(steps) >= hold:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or stalled before the kill (rc {proc.returncode}):\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return saved_step(checkpoint_dir(run_dir) / "last.ckpt")


def resume(args: list[str], run_dir: Path) -> str:
    env = {KEYLOG_ENV: str(run_dir / "keys_resumed")}
    return run_app([*args, "--ckpt_path", "last"], timeout=300, threads=1, env=env)


def one_epoch_args(data: Path, train: Path, run_dir: Path, every: int, *extra: str) -> list[str]:
    return [*app_args(data, run_dir, -1, every, "--data.train_shards", str(train), *extra),
            "--trainer.max_epochs", "1", "--trainer.callbacks+=tests.helpers.probes.KeyLog"]


def trained_once(run_dir: Path, cut: int, ranks: int) -> list[str]:
    """Keys trained in the epoch: the killed run's up to its checkpoint, then the resumed run's."""
    keys, repeated = [], 0
    for rank in range(ranks):
        killed = logged(run_dir / "keys_killed", rank)
        assert max(r["step"] for r in killed) > cut  # it trained past the checkpoint: those batches come again
        keys += [k for r in killed if r["step"] <= cut for k in r["keys"]]
        resumed = logged(run_dir / "keys_resumed", rank)
        assert resumed and min(r["step"] for r in resumed) == cut + 1
        keys += [k for r in resumed for k in r["keys"]]
        repeated += sum(len(r["keys"]) for r in killed if r["step"] > cut)
    assert repeated > 0
    return sorted(keys)


ALL_KEYS = sorted(f"shapegrid{i:08d}" for i in range(32))
CASES = {
    "workers0": ((32, 64), ()),
    "workers2": ((32, 64), ("--data.num_workers", "2", "--data.persistent_workers", "true")),
    "packed": ((32, 64), ("--data.packed", "true")),
    "ddp": ((48, 48), ("-c", str(CONFIGS / "ddp.yaml"), "--trainer.devices", "2")),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.distributed) if c == "ddp" else c for c in CASES])
def test_sigkill_mid_epoch_then_resume_trains_every_sample_once(app_data, tmp_path_factory, tmp_path, case):
    side, extra = CASES[case]
    ranks = 2 if case == "ddp" else 1
    if ranks > 1:
        extra = (*extra, "--data.max_batch_size", "2")  # equal-size images: 8 batches on each rank, no padding
    data, train = app_data, shards(tmp_path_factory, case, side)
    args = one_epoch_args(data, train, tmp_path, 2, *extra)
    cut = kill_after_checkpoint(args, tmp_path, 2, ranks)
    output = resume(args, tmp_path)
    assert "no data stream position" not in output
    assert "dataloader is not resumable" not in output  # Lightning's false alarm is silenced: this one resumes
    assert trained_once(tmp_path, cut, ranks) == ALL_KEYS


def test_checkpoint_without_stream_state_resumes_with_a_warning(app_data, tmp_path_factory, tmp_path):
    """An older version's checkpoint (no stream state): resumes at its step, warns, the stream restarts."""
    data, train = app_data, shards(tmp_path_factory, "workers0", (32, 64))
    args = one_epoch_args(data, train, tmp_path, 2)
    cut = kill_after_checkpoint(args, tmp_path, 2, 1)
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    del checkpoint["UHDDataModule"]  # where the DataModule keeps the stream's position
    torch.save(checkpoint, last)
    output = resume(args, tmp_path)
    assert "the checkpoint holds no data stream position" in output
    resumed = logged(tmp_path / "keys_resumed")
    assert min(r["step"] for r in resumed) == cut + 1  # the loop resumed at the saved step
    killed = [k for r in logged(tmp_path / "keys_killed") if r["step"] <= cut for k in r["keys"]]
    assert set(killed) & {k for r in resumed for k in r["keys"]}  # the stream restarted: samples trained again
