"""configs/release.yaml: stage 3 / stage 2 on a release folder given as --model.init_from."""

import json
import sys

import pytest

from callbacks import ZeroInitCheck, ZeroInitError
from callbacks.wtc_modules import find_wtc
from datamodules import write_synthetic
from llava_uhd.vision.resize import ReleaseResolutionPolicy

from ..helpers.app import CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "src"))
from main import config_error, main  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_cfg_data")
    write_synthetic("shapegrid", 4, str(root / "train"), seed=0, min_side=32, max_side=64)
    return root / "train"


def args(stage, release_dir, shards, tmp_path, *more):
    return ["-c", str(CONFIGS / stage), "-c", str(CONFIGS / "release.yaml"), "--model.init_from", str(release_dir),
            "--data.train_shards", str(shards), "--data.num_workers", "0", "--data.batch_token_budget", "2048",
            "--data.max_length", "2048", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true",
            "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                            "init_args": {"save_dir": str(tmp_path / "runs")}}),
            "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1", *more]


@pytest.mark.parametrize("stage,cls", [("stage3.yaml", "SFT"), ("stage2.yaml", "Pretrain")])
def test_release_overlay_builds_the_release_model(stage, cls, release_dir, shards, tmp_path):
    cli = main(args(stage, release_dir, shards, tmp_path), run=False)
    module = cli.model
    assert type(module).__name__ == cls and "wtc" in module.trainable_parts
    model = module.model
    assert model.config.projector == "mlp" and model.encoder.cfg.rope == "2d"
    assert isinstance(model.policy, ReleaseResolutionPolicy)
    assert model.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.image_token_id
    assert all(not m.fc1.weight.any() for _, m in find_wtc(model))  # as released
    checks = [c for c in cli.trainer.callbacks if isinstance(c, ZeroInitCheck)]
    assert len(checks) == 1 and not checks[0].check_start and checks[0].check_gradient


def test_fine_tuning_the_release_stops_on_the_dead_gate_and_runs_with_reinit(release_dir, shards, tmp_path):
    with pytest.raises(ZeroInitError, match="--model.reinit_wtc_gate true") as err:
        main(["fit", *args("stage3.yaml", release_dir, shards, tmp_path)])
    assert config_error(err.value).startswith("model.reinit_wtc_gate: model.encoder.wtc.1")  # one line, no traceback
    cli = main(["fit", *args("stage3.yaml", release_dir, shards, tmp_path, "--model.reinit_wtc_gate", "true")])
    assert cli.trainer.global_step == 1
    assert all(m.fc2.weight.any() for _, m in find_wtc(cli.model.model))  # the gates trained one step


def test_release_overlay_without_a_folder_names_the_setting(release_dir, tmp_path, shards):
    with pytest.raises(ValueError, match="model.llm: empty"):
        main(args("stage3.yaml", release_dir, shards, tmp_path, "--model.init_from", "null"), run=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="model.init_from: .*is not a model folder"):
        main(args("stage3.yaml", release_dir, shards, tmp_path, "--model.init_from", str(tmp_path / "plain")),
             run=False)


def test_a_release_with_an_llm_set_points_to_the_overlay(release_dir, tmp_path):
    from llava_uhd.stages import SFT

    with pytest.raises(ValueError, match="is a LLaVA-format release; leave model.llm empty"):
        SFT(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 64}, tokenizer=str(tmp_path / "tok"),
            init_from=str(release_dir))


def test_resize_policy_can_be_chosen_for_a_stage(release_dir, shards, tmp_path):
    cli = main(args("stage3.yaml", release_dir, shards, tmp_path, "--model.resize_policy", "default"), run=False)
    assert cli.model.model.config.resize_policy == "default"
    assert not isinstance(cli.model.model.policy, ReleaseResolutionPolicy)
    with pytest.raises(SystemExit):
        main(args("stage3.yaml", release_dir, shards, tmp_path, "--model.resize_policy", "relase"), run=False)
