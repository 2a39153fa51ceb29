"""Two CPU processes (gloo) through the app: DDP (``configs/ddp.yaml``) and FSDP2 (``configs/fsdp2.yaml``,
Lightning's ``ModelParallelStrategy``) train stage 2, save, and resume from ``--ckpt_path last`` at the saved
step. Each first run sees a NaN loss on one rank only: both ranks skip that batch (no hang), and the DDP
replicas stay identical.
``configs/fsdp1.yaml`` (CUDA only) is checked to resolve to a working ``FSDPStrategy``.

Each fixture launches ``python src/main.py fit`` twice (run, then resume); process start-up dominates the cost.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .helpers.app import CONFIGS, MAIN, ROOT, app_args, app_env, checkpoint_dir, probe, run_app, saved_step

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch_twice(data: Path, run_dir: Path, overlay: str, *extra: str, data_args: tuple[str, ...] = ()) -> None:
    """4 steps saving every 2, then a resume to step 6; probes in ``run_dir/first`` and ``run_dir/resumed``.

    ``data_args`` go to both runs: a resume must keep the checkpoint's data settings (the stream resumes mid-epoch).
    """
    common = ("-c", str(CONFIGS / overlay), "--trainer.devices", "2", *data_args)
    run_app(app_args(data, run_dir, 4, 2, *common, *extra), threads=1)
    (run_dir / "probe").rename(run_dir / "first")
    output = run_app(app_args(data, run_dir, 6, 2, *common, "--ckpt_path", "last"), threads=1)
    (run_dir / "probe").rename(run_dir / "resumed")
    assert "resuming from" in output


@pytest.fixture(scope="module")
def ddp_run(app_data, tmp_path_factory) -> Path:
    data = app_data
    run_dir = tmp_path_factory.mktemp("ddp")
    launch_twice(data, run_dir, "ddp.yaml", "--model.init_args.nan_steps", "[1]", "--model.init_args.nan_ranks", "[1]")
    return run_dir


@pytest.fixture(scope="module")
def fsdp2_run(app_data, tmp_path_factory) -> Path:
    data = app_data
    run_dir = tmp_path_factory.mktemp("fsdp2")
    nan = ("--model.init_args.nan_steps", "[2]", "--model.init_args.nan_ranks", "[0]")
    # packed (mixed-size) batches: the packed ViT path must go through each sharded block's hooks
    export = "--trainer.callbacks+=callbacks.ExportModel"
    launch_twice(data, run_dir, "fsdp2.yaml", export, *nan, data_args=("--data.packed", "true"))
    return run_dir


def probe_phase(run_dir: Path, phase: str) -> list[dict]:
    return [probe(run_dir, rank, phase) for rank in (0, 1)]


def test_ddp_saves_and_resumes_at_the_saved_step(ddp_run):
    first, resumed = probe_phase(ddp_run, "first"), probe_phase(ddp_run, "resumed")
    assert [p["world_size"] for p in first] == [2, 2]
    assert [p["end_step"] for p in first] == [4, 4]
    last = checkpoint_dir(ddp_run) / "last.ckpt"
    assert last.is_file() and saved_step(last) == 6  # re-saved at the resumed run's step 6
    assert saved_step(last.with_name("epoch=0-step=4.ckpt")) == 4
    assert [p["start_step"] for p in resumed] == [4, 4]  # continued from step 4, not from 0
    assert [p["end_step"] for p in resumed] == [6, 6]
    assert [p["nonfinite_at_start"] for p in resumed] == [1, 1]  # the skip counter is part of the checkpoint
    assert [p["adam_steps"] for p in resumed] == [5, 5]  # optimizer state resumed too: 3 + 2 steps
    assert resumed[0]["digest"] == resumed[1]["digest"]


def test_ddp_nan_on_one_rank_is_skipped_by_both(ddp_run):
    first = probe_phase(ddp_run, "first")
    for seen in first:  # rank 1 saw the NaN at step 1; rank 0 had a finite loss and skipped all the same
        assert seen["nonfinite_steps"] == 1
        assert seen["unchanged"] == {"0": False, "1": True, "2": False, "3": False}
        assert seen["adam_steps"] == 3 and seen["grads_seen"] == 3
    assert first[0]["digest"] == first[1]["digest"]  # the replicas never diverged


def test_fsdp2_shards_every_parameter_and_frozen_ones_get_no_gradients(fsdp2_run):
    first = probe_phase(fsdp2_run, "first")
    for seen in first:
        assert seen["world_size"] == 2 and seen["end_step"] == 4
        assert all(seen["sharded"].values())  # ViT blocks, decoder layers, and the root's own parameters
        assert seen["trained"] and not any(n.startswith("model.llm.") for n in seen["trained"])  # LLM frozen
        assert seen["frozen_grads"] == 0 and seen["grads_seen"] == 3
    assert first[0]["digest"] != first[1]["digest"]  # each rank holds a different shard


def test_fsdp2_nan_on_one_rank_is_skipped_by_both(fsdp2_run):
    for seen in probe_phase(fsdp2_run, "first"):  # rank 0 saw the NaN at step 2
        assert seen["nonfinite_steps"] == 1
        assert seen["unchanged"] == {"0": False, "1": False, "2": True, "3": False}  # this rank's shard
        assert seen["adam_steps"] == 3


def test_fsdp2_saves_a_distributed_checkpoint_and_resumes(fsdp2_run):
    last = checkpoint_dir(fsdp2_run) / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and sorted(last.glob("*.distcp"))
    assert saved_step(last) == 6 and saved_step(last.with_name("epoch=0-step=4.ckpt")) == 4
    resumed = probe_phase(fsdp2_run, "resumed")
    assert [p["start_step"] for p in resumed] == [4, 4]
    assert [p["end_step"] for p in resumed] == [6, 6]
    assert [p["adam_steps"] for p in resumed] == [5, 5]  # 3 + 2: the optimizer's sharded state was restored
    assert [p["nonfinite_at_start"] for p in resumed] == [1, 1]


def test_fsdp1_overlay_resolves_to_an_fsdp_strategy():
    """FSDP1 needs CUDA: check the overlay parses and its settings build a strategy (nothing is launched)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    out = subprocess.run(
        [sys.executable, str(MAIN), "fit", "-c", str(CONFIGS / "stage3.yaml"),
         "-c", str(CONFIGS / "fsdp1.yaml"), "--print_config"],
        cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    config = yaml.safe_load(out.stdout)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["model"]["init_args"]["gradient_checkpointing"] is False  # FSDP checkpoints the layers instead
    args = strategy["init_args"]
    classes = {Block, Qwen2DecoderLayer}
    assert {load(p) for p in args["auto_wrap_policy"]} == classes
    assert {load(p) for p in args["activation_checkpointing_policy"]} == classes
    built = FSDPStrategy(auto_wrap_policy=classes, activation_checkpointing_policy=classes,
                         sharding_strategy=args["sharding_strategy"], state_dict_type=args["state_dict_type"])
    assert built.kwargs["use_orig_params"] and built._state_dict_type == "sharded"


def load(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_fsdp2_run_exports_a_loadable_model_folder(fsdp2_run):
    from llava_uhd.mllm import LlavaUHD

    exports = list((fsdp2_run / "runs").rglob("export/model.safetensors"))
    assert len(exports) == 1
    model = LlavaUHD.from_pretrained(exports[0].parent)  # gathered from the shards of both ranks
    assert all(torch.isfinite(p).all() for p in model.parameters())
