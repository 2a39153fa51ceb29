"""The LightningCLI app: every config parses, every stage trains on the tiny overlay, bad settings stop early."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules import write_synthetic
from llava_uhd.errors import SettingsError

from .helpers.app import CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "src"))
from main import cli, config_error, main  # noqa: E402

STAGES = ["stage1.yaml", "stage2.yaml", "stage3.yaml"]
OVERLAYS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.name not in STAGES + ["base.yaml"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_synthetic("shapegrid", 24, str(root / "train"), seed=0, min_side=64, max_side=160)
    write_synthetic("shapegrid", 6, str(root / "val"), seed=1, min_side=64, max_side=160)
    return root


def tiny_args(root: Path, stage: str, steps: int = 2) -> list[str]:
    return [
        "-c", str(CONFIGS / stage), "-c", str(CONFIGS / "tiny.yaml"),
        "--data.synthetic", "null",
        "--data.train_shards", str(root / "train"), "--data.val_shards", str(root / "val"),
        "--model.tokenizer", str(root / "tokenizer"),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
    ]


@pytest.mark.parametrize("stage", STAGES)
def test_full_size_stage_configs_parse(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / stage), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    stage_class = {"stage1.yaml": "PreAlignment", "stage2.yaml": "Pretrain", "stage3.yaml": "SFT"}[stage]
    assert f"llava_uhd.stages.{stage_class}" in printed
    assert "vit_uhd_so400m_patch10_siglip" in printed and "bf16-mixed" in printed  # base.yaml loaded first


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_parses_on_a_stage(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(CONFIGS / "stage2.yaml"), "-c", str(CONFIGS / overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_command_line_overrides_reach_the_model(tiny_data, capsys):
    args = [*tiny_args(tiny_data, "stage2.yaml"), "--model.wtc_pooling", "avg", "--model.wtc_layers", "[3]",
            "--model.pos_embed_init", "random"]
    cli = main(args, run=False)  # no subcommand: parse and instantiate only
    encoder = cli.model.model.encoder
    assert list(encoder.wtc) == ["3"] and encoder.wtc["3"].pooling == "avg"
    assert encoder.cfg.pos_embed_init == "random" and encoder.pos_embed.std() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("stage,frozen", [("stage1.yaml", {"vit", "llm"}), ("stage2.yaml", {"llm"}),
                                          ("stage3.yaml", set())])
def test_each_stage_fits_on_the_tiny_overlay(tiny_data, stage, frozen):
    cli = main(["fit", *tiny_args(tiny_data, stage, steps=3)])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3
    assert set(module.frozen_parts) == frozen
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["train/loss"].item()))
    log_dir = Path(trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()  # the resolved config is saved with the run
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "export" / "model.safetensors").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "override,key",
    [
        (["--model.wtc_pooling", "max"], "wtc_pooling"),
        (["--model.pos_embed_init", "zeros"], "pos_embed_init"),
        (["--model.wtc_layers", "[2, 9]"], "model.wtc_layers"),
        (["--model.encoder_weights", "missing/siglip.safetensors"], "model.encoder_weights"),
        (["--data.train_shards", "missing/shards"], "data.train_shards"),
        (["--model.llm", "missing/qwen2"], "model.llm"),
    ],
)
def test_bad_settings_stop_before_training_and_name_the_key(tiny_data, override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", *tiny_args(tiny_data, "stage2.yaml"), *override])
    captured = capsys.readouterr()
    message = f"{exit_info.value.code} {captured.err}"
    assert exit_info.value.code not in (0, None)
    assert key in message
    assert "train/loss" not in captured.out + captured.err  # nothing trained


def test_the_entry_script_runs_as_a_command():
    result = subprocess.run([sys.executable, str(ROOT / "src" / "main.py"), "fit", "--model.wtc_layers", "[99]",
                             "-c", str(CONFIGS / "stage2.yaml"), "-c", str(CONFIGS / "tiny.yaml")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "config error: model.wtc_layers" in result.stderr


def test_config_error_is_found_in_an_exception_chain():
    try:
        try:
            raise SettingsError("model.wtc_layers: block 9 is past the last block")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert config_error(outer) == "model.wtc_layers: block 9 is past the last block"
    assert config_error(ValueError("some bug")) is None
