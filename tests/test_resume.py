"""Kill and resume: a run killed by SIGKILL during training, or in the middle of writing a checkpoint, resumes
with ``--ckpt_path last`` at the last saved step, and every ``*.ckpt`` it leaves loads with ``weights_only``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from llava_uhd.checkpoint_io import PARTIAL

from .helpers.app import ROOT, app_args, checkpoint_dir, probe, run_app, saved_step, start_app


def assert_checkpoints_load(directory: Path) -> list[Path]:
    """Every ``*.ckpt`` file loads with ``weights_only=True`` (a truncated file raises)."""
    files = sorted(p for p in directory.glob("*.ckpt") if p.is_file())
    for path in files:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert "state_dict" in checkpoint and "global_step" in checkpoint, path
    return files


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 180, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the awaited moment:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def resume_and_check(data: Path, run_dir: Path, extra_steps: int = 2, every: int = 2) -> tuple[int, dict]:
    """Resume the killed run with ``--ckpt_path last``; it must start at last.ckpt's step and finish."""
    ckpts = checkpoint_dir(run_dir)
    step = saved_step(ckpts / "last.ckpt")
    output = run_app(app_args(data, run_dir, step + extra_steps, every, "--ckpt_path", "last"))
    assert f"resuming from {ckpts / 'last.ckpt'}" in output
    seen = probe(run_dir)
    assert seen["start_step"] == step  # continues at the saved step, not from 0
    assert seen["end_step"] == step + extra_steps
    return step, seen


@pytest.mark.slow
def test_sigkill_during_training_resumes_from_last_checkpoint(app_data, tmp_path):
    data = app_data
    log = tmp_path / "killed.log"
    proc = start_app(app_args(data, tmp_path, 1000, 2), log)
    ckpts = tmp_path / "runs" / "stage2" / "version_0" / "checkpoints"
    wait_for(lambda: (ckpts / "epoch=0-step=4.ckpt").is_file(), proc, log)
    time.sleep(0.5)  # inside the following steps
    kill(proc)
    files = assert_checkpoints_load(ckpts)
    assert ckpts / "last.ckpt" in files
    step, _ = resume_and_check(data, tmp_path)
    assert step >= 4 and step % 2 == 0
    assert_checkpoints_load(ckpts)


def saving_over_a_saved_last(ckpts: Path) -> bool:
    """A complete last.ckpt exists and the next one is being written."""
    return (ckpts / "last.ckpt").is_file() and any(ckpts.glob(f"last.ckpt{PARTIAL}*"))


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_leaves_no_corrupt_checkpoint(app_data, tmp_path):
    """Every step writes last.ckpt with 48 MB of ballast (only last.ckpt: save_top_k 0), so a write takes long
    enough to be caught: the kill is sent as soon as ``last.ckpt.partial-<pid>`` appears over a complete
    last.ckpt. A kill that still lands after the rename is retried with a fresh run (at most 3 runs)."""
    data = app_data
    extra = ("--model.init_args.ballast_mb", "48", "--checkpoint.save_top_k", "0")
    for attempt in range(3):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        log = run_dir / "killed.log"
        proc = start_app(app_args(data, run_dir, 1000, 1, *extra), log)
        ckpts = run_dir / "runs" / "stage2" / "version_0" / "checkpoints"

        wait_for(partial(saving_over_a_saved_last, ckpts), proc, log, poll=0.005)
        kill(proc)
        if any(ckpts.glob(f"last.ckpt{PARTIAL}*")):
            break
    else:
        pytest.fail("no kill landed inside a checkpoint save in 3 runs")
    files = assert_checkpoints_load(ckpts)
    assert files == [ckpts / "last.ckpt"]  # the previous last.ckpt, intact
    resume_and_check(data, run_dir, extra_steps=1, every=1)
    assert not any(ckpts.glob(f"*{PARTIAL}*"))  # the next save cleared the killed one's leftovers

def test_ckpt_path_last_finds_distributed_checkpoint_directories(tmp_path, monkeypatch):
    """FSDP2's last.ckpt is a directory whose files are overwritten in place: the newest file dates it."""
    monkeypatch.syspath_prepend(str(ROOT / "src"))
    from main import newest_last_checkpoint

    old_file = tmp_path / "stage2" / "version_0" / "checkpoints" / "last.ckpt"
    new_dir = tmp_path / "stage2" / "version_1" / "checkpoints" / "last.ckpt"
    old_file.parent.mkdir(parents=True)
    new_dir.mkdir(parents=True)
    old_file.write_bytes(b"x")
    (new_dir / "meta.pt").write_bytes(b"x")
    os.utime(new_dir, (1, 1))  # the directory itself looks old; its meta.pt was just rewritten
    os.utime(old_file, (time.time() - 60, time.time() - 60))
    assert newest_last_checkpoint(tmp_path, "stage2") == new_dir
    os.utime(new_dir / "meta.pt", (2, 2))
    assert newest_last_checkpoint(tmp_path, "stage2") == old_file


def test_distributed_checkpoint_directory_is_swapped_in_whole(tmp_path):
    """FSDP2 saves into ``last.ckpt.partial-dcp`` and then takes ``last.ckpt``'s place in one step."""
    from llava_uhd.strategies import publish

    target, new = tmp_path / "last.ckpt", tmp_path / f"last.ckpt{PARTIAL}dcp"
    new.mkdir()
    (new / "meta.pt").write_text("step 2")
    publish(new, target)  # first save: a rename
    assert (target / "meta.pt").read_text() == "step 2" and not new.exists()
    new.mkdir()
    (new / "meta.pt").write_text("step 4")
    publish(new, target)  # over an existing checkpoint: exchanged, then the old one removed
    assert (target / "meta.pt").read_text() == "step 4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_an_optimizer_given_in_the_config_trains_checkpoints_and_resumes(app_data, tmp_path):
    """``--model.optimizer`` / ``--model.lr_scheduler`` (class_path + init_args): the checkpoints hold plain data
    (they load with ``weights_only``), their optimizer and schedule state is the one asked for, and a resume
    continues it."""
    chosen = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.momentum", "0.9",
              "--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--model.lr_scheduler.step_size", "3"]
    run_app(app_args(app_data, tmp_path, 2, 2, *chosen))
    run_app(app_args(app_data, tmp_path, 4, 2, *chosen, "--ckpt_path", "last"))
    last = torch.load(checkpoint_dir(tmp_path) / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4 and "optimizer" not in last["hyper_parameters"]
    (optimizer,), (schedule,) = last["optimizer_states"], last["lr_schedulers"]
    assert optimizer["param_groups"][0]["momentum"] == 0.9
    assert "momentum_buffer" in next(iter(optimizer["state"].values()))
    assert schedule["step_size"] == 3 and schedule["last_epoch"] == 4
