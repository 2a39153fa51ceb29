"""Training CLI mistakes: each ends in one message naming the setting, a non-zero exit, no traceback, and
nothing written where it should not be (no generated data in a typed path, no checkpoint from an empty run)."""

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from datamodules import ShardSetWriter, write_synthetic
from llava_uhd.errors import SettingsError
from llava_uhd.stages import SFT, check_learning_rates

from .helpers.app import CONFIGS, ROOT

sys.path.insert(0, str(ROOT / "src"))
from main import cli  # noqa: E402

ASK = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    write_synthetic("shapegrid", 8, str(root / "good"), seed=0, min_side=64, max_side=128, shard_size=8)
    writer = ShardSetWriter(str(root / "broken"), 4)
    for i in range(6):  # header-sized junk: every sample is skipped as corrupt_image
        writer.write({"__key__": f"junk{i}", "jpg": b"\xff\xd8 not a jpeg", "json": json.dumps(ASK).encode()},
                     [(64, 64)])
    writer.close()
    (root / "data.json").write_text(json.dumps([{"id": "a", **ASK}]))
    return root


def args_for(root: Path, *extra: str, stage: str = "stage2.yaml") -> list[str]:
    return ["fit", "-c", str(CONFIGS / stage), "-c", str(CONFIGS / "tiny.yaml"),
            "--data.synthetic_root", str(root / "generated"), "--model.tokenizer", str(root / "tokenizer"),
            "--trainer.logger.init_args.save_dir", str(root / "runs"), "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", *extra]


def fails(args: list[str], capsys) -> str:
    """The message of a run that must stop with a non-zero exit and no traceback."""
    with pytest.raises(SystemExit) as info:
        cli(args)  # any exception other than SystemExit would be a traceback for the user
    captured = capsys.readouterr()
    assert info.value.code not in (0, None)
    message = f"{info.value.code}\n{captured.err}"
    assert "Traceback" not in message
    return message + captured.out


def runs_written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "runs").rglob("*")) if (root / "runs").exists() else []


def test_shard_spec_mistakes_stop_before_anything_is_written(data, capsys):
    typo = data / "my_shards"
    cases = [
        (["--data.train_shards", str(typo)], f"data.train_shards: no such file or folder: '{typo}'"),
        (["--data.train_shards", str(data / "sh-{000000..000003}.tar")], "data.train_shards: the pattern"),
        (["--data.val_shards", str(data / "data.json")], "python -m datamodules.convert"),
        (["--data.batch_token_budget", "-5"], "data.batch_token_budget: must be positive"),
        (["--ckpt_path", str(data / "missing.ckpt")], "ckpt_path: no checkpoint file at"),
        (["--ckpt_path", str(data / "good")], "is a folder, not a checkpoint"),
        (["--model.lr.vitt", "1e-3"], "model.lr: unknown part(s) vitt; the parts are patch_embed, wtc, vit"),
        (["--model.encoder", "vit_uhd_tiny"], "model.encoder: unknown encoder 'vit_uhd_tiny'"),
    ]
    for extra, expected in cases:
        message = fails(args_for(data, *extra), capsys)
        assert expected in message, (extra, message)
        assert runs_written(data) == [], f"{extra} left {runs_written(data)}"  # no empty version_N folders
    assert not typo.exists()  # a typed path is never filled with generated data
    assert sorted(p.name for p in data.iterdir()) == ["broken", "data.json", "good", "tokenizer"]


def test_a_wrong_type_in_a_setting_is_a_parser_error(data, capsys):
    with pytest.raises(SystemExit) as info:
        cli(args_for(data, "--trainer.max_steps", "many"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and 'config error: Parser key "trainer.max_steps"' in err
    assert "usage:" not in err and "Traceback" not in err  # the message, not a page of usage


@pytest.mark.parametrize("extra, expected", [
    (["--data.max_batchsize", "8"], "config error: data.max_batchsize: no such setting"),
    (["--data.max_batch", "8"], "config error: data.max_batch: no such setting"),  # not an abbreviation
    (["--trainer.max_step", "3"], "config error: unrecognized arguments: --trainer.max_step 3"),
    (["--model.projector", "mpl"], "config error: model.projector: Expected a typing.Literal['mlp', 'merger']. "
                                   "Got value: mpl"),
    (["--model.lr.vit", "abc"], "config error: model.lr.vit: Expected a <class 'float'>. Got value: abc"),
    (["--model.wtc_layers", "4"], "config error: model.wtc_layers: Expected a <class 'list'>. Got value: 4"),
])
def test_a_typo_or_wrong_type_in_a_model_or_data_setting_is_one_line(data, capsys, extra, expected):
    # jsonargparse explains a subclass section by listing every union member it tried: cut to the setting
    with pytest.raises(SystemExit) as info:
        cli(args_for(data, *extra))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(expected)
    assert len(err.strip().splitlines()) == 2 and "Subtypes" not in err  # the message and the --help hint


def test_a_typo_in_a_config_file_names_the_setting(data, tmp_path, capsys):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("data:\n  init_args:\n    max_batchsize: 8\n")
    with pytest.raises(SystemExit) as info:
        cli(args_for(data, "-c", str(overlay)))
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("config error: data.max_batchsize: no such setting")


def test_a_run_on_mostly_broken_data_fails_with_counts_and_shows_skips(data, capsys):
    spec = f"[{data / 'good' / 'shapegrid-000000.tar'}, {data / 'broken'}]"  # a single .tar works as a spec
    whole_epoch = ["--trainer.max_steps", "-1", "--checkpoint.every_n_train_steps", "1000"]
    message = fails(args_for(data, "--data.train_shards", spec, *whole_epoch), capsys)
    # the data is at fault, not a setting: its own prefix
    assert "data error: data.train_shards: 6 of 14 samples skipped (43% > data.max_skip_fraction 10%): " \
           "corrupt_image: 6" in message and "config error" not in message
    assert "epoch 0: trained on 8 samples; skipped 6 (corrupt_image: 6)" in message  # on the console too
    # with a checkpoint due mid-epoch (tiny.yaml: every 4 steps), the run fails there instead of saving it
    message = fails(args_for(data, "--data.train_shards", spec, "--trainer.max_steps", "-1"), capsys)
    assert "samples skipped (" in message and "corrupt_image: " in message
    assert not list((data / "runs").rglob("*.ckpt")) and not list((data / "runs").rglob("export"))


def test_the_same_run_passes_with_a_looser_skip_share(data, capsys, tmp_path, recwarn):
    spec = f"[{data / 'good' / 'shapegrid-000000.tar'}, {data / 'broken'}]"
    cli(args_for(tmp_path, "--data.train_shards", spec, "--data.max_skip_fraction", "0.5", "--trainer.max_steps", "-1"))
    assert "epoch 0: trained on 8 samples; skipped 6 (corrupt_image: 6)" in capsys.readouterr().out
    # no false alarm about the stream's length (it is each worker's plan, exact)
    assert not [w for w in recwarn if "has `__len__` defined" in str(w.message)]
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_a_run_that_trains_on_nothing_fails_and_leaves_no_checkpoint(data, tmp_path, capsys):
    message = fails(args_for(tmp_path, "--data.train_shards", str(data / "broken")), capsys)
    assert f"data error: data.train_shards: no usable training sample in '{data / 'broken'}'" in message
    assert "epoch 0: trained on 0 samples; skipped 6 (corrupt_image: 6)" in message
    assert not list((tmp_path / "runs").rglob("*.ckpt")) and not list((tmp_path / "runs").rglob("export"))


def test_a_shard_of_images_without_json_names_the_reason(tmp_path, capsys, caplog):
    # every sample skipped, so no batch carries the counts: they still reach the console and the message
    writer = ShardSetWriter(str(tmp_path / "nojson"), 4)
    for i in range(3):
        writer.write({"__key__": f"img{i}", "jpg": (ROOT / "tests" / "__init__.py").read_bytes()}, [(64, 64)])
    writer.close()
    message = fails(args_for(tmp_path, "--data.train_shards", str(tmp_path / "nojson")), capsys)
    assert "no usable training sample" in message and "(skipped 3: no_text: 3)" in message
    assert "no json or txt member beside jpg" in caplog.text  # the named skip says what is missing
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def files_in(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*")
            if f.is_file()}


def test_a_resume_refused_for_other_shards_names_them_and_writes_nothing(tmp_path, capsys):
    # before: "other shard names or sizes, this run has these;" naming none, and the refused attempt left a
    # TensorBoard events file (so train/loss had its resumed step twice) and rewrote config.yaml
    shards = tmp_path / "shards"
    write_synthetic("shapegrid", 24, str(shards), seed=0, min_side=64, max_side=128, shard_size=8)
    common = ["--data.train_shards", str(shards), "--data.val_shards", "null", "--trainer.limit_val_batches", "0"]
    cli(args_for(tmp_path, *common, "--trainer.max_steps", "4"))  # tiny.yaml: a checkpoint every 4 steps
    (tmp_path / "kept").mkdir()
    (shards / "shapegrid-000000.tar").rename(tmp_path / "kept" / "shapegrid-000000.tar")
    shutil.copy(shards / "shapegrid-000001.tar", shards / "extra-000000.tar")
    before = files_in(tmp_path / "runs")
    resume = args_for(tmp_path, *common, "--trainer.max_steps", "8", "--ckpt_path", "last")
    message = fails(resume, capsys)
    assert ("config error: data.train_shards: the checkpoint's stream was saved with 3 shards, this run has 3 "
            "shards: 1 added (extra-000000.tar), 1 removed (shapegrid-000000.tar); resume with") in message
    assert files_in(tmp_path / "runs") == before  # no events file, no version folder, no checkpoint, same config
    # the checkpoint's shards again: the same resume goes on from step 4
    (shards / "extra-000000.tar").unlink()
    (tmp_path / "kept" / "shapegrid-000000.tar").rename(shards / "shapegrid-000000.tar")
    cli(resume)
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8


def test_learning_rate_parts_are_checked():
    assert check_learning_rates({"vit": 1e-4}) == {"vit": 1e-4}
    for lr, expected in (({"vitt": 1e-3}, "unknown part(s) vitt"), ({"vit": -1.0}, "model.lr.vit"),
                         ({"llm": "fast"}, "model.lr.llm")):
        with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check_learning_rates(lr)


def test_init_from_does_not_report_tied_embeddings_as_left_at_init(tmp_path, caplog):
    kwargs = dict(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 32, "tie_word_embeddings": True},
                  tokenizer=str(tmp_path / "tok"))
    source = SFT(**kwargs)
    assert source.model.llm.config.tie_word_embeddings
    source.model.save_pretrained(tmp_path / "export")
    weights = next((tmp_path / "export").glob("*.safetensors"))
    with caplog.at_level(logging.WARNING, logger="llava_uhd.build"):
        SFT(**kwargs, init_from=str(tmp_path / "export"))
    assert "left at init" not in caplog.text
    state = load_file(str(weights))  # a tensor that really is missing is still reported
    save_file({k: v for k, v in state.items() if not k.startswith("projector.")}, str(weights))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_uhd.build"):
        SFT(**kwargs, init_from=str(tmp_path / "export"))
    assert "left at init projector." in caplog.text and "embed_tokens" not in caplog.text


def test_a_corrupt_checkpoint_is_named_not_a_traceback(data, tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x02 not a checkpoint" * 64)
    message = fails(args_for(tmp_path, "--ckpt_path", str(junk)), capsys)
    assert f"config error: ckpt_path: {junk} is not a readable checkpoint" in message
    assert not runs_written(tmp_path)  # found before a log folder is made
    message = fails(args_for(tmp_path, "--model.init_from", str(junk)), capsys)
    assert f"config error: model.init_from: {junk} is not a readable checkpoint" in message
    # a damaged last.ckpt, found by `--ckpt_path last` (read by the trainer, not by the parser)
    last = tmp_path / "runs" / "stage2" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04" + b"\x00" * 256)
    message = fails(args_for(tmp_path, "--ckpt_path", "last"), capsys)
    assert f"config error: ckpt_path: {last} is not a readable checkpoint" in message


def test_a_typo_in_a_config_dict_llm_is_named(data, capsys):
    # transformers keeps an unknown key as a loose attribute: the model would get the default depth silently
    llm = "{hidden_size: 64, num_hiden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}"
    message = fails(args_for(data, "--model.llm", llm), capsys)
    assert "config error: model.llm: unknown key(s) for a qwen2 config: num_hiden_layers (did you mean " \
           "num_hidden_layers?)" in message
    message = fails(args_for(data, "--model.llm", "{model_type: qwen9, hidden_size: 64}"), capsys)
    assert "config error: model.llm: not a valid 'qwen9' config: Unrecognized model identifier: qwen9" in message
    assert len(message) < 400


@pytest.mark.parametrize("extra, expected", [
    (["--data.sample_shuffle", "-3"], "data.sample_shuffle: a buffer of 0 (off) or more samples, got -3"),
    (["--data.batches_per_epoch", "0"], "data.batches_per_epoch: must be positive (or null), got 0"),
    (["--data.min_pixels", "-5"], "data.min_pixels / max_pixels / max_side / pixels_per_token: need 0 < min_pixels"),
    (["--data.max_side", "0"], "max_side 0 is smaller than the multiple 40"),
    (["--model.max_new_tokens", "-1"], "model.max_new_tokens: at least 1, got -1"),
    (["--model.distill_weight", "-1"], "model.distill_weight: 0 (off) or more, got -1.0"),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches: at least 1, got 0"),
])
def test_negative_or_zero_numbers_are_named(data, tmp_path, capsys, extra, expected):
    # each bad number stops the run before training with one message naming the setting, no traceback
    message = fails(args_for(tmp_path, *extra), capsys)
    assert expected in message and message.count("config error") == 1
    assert not list((tmp_path / "runs").rglob("*.ckpt"))
