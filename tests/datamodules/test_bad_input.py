"""A user's mistakes in data: one check for converter and loader, clear converter errors, strict shard specs."""

import json
import logging
import os
import warnings

import pytest

from datamodules import convert
from datamodules.datamodule import UHDDataModule
from datamodules.samples import SampleDecoder, SampleError, check_sample
from datamodules.shards import resolve_shards, synthetic_dir
from datamodules.writer import SKIPPED_NAME
from llava_uhd.errors import SettingsError
from llava_uhd.vision.resize import ResolutionPolicy

from .conftest import SMALL, bomb_png, image_bytes

ASK = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]
# id -> (image bytes or None, conversations, the reason both converter and loader must give)
BAD = {
    "cut": (image_bytes(64, 64)[:300], ASK, "corrupt_image"),  # header intact, data cut off
    "junk": (b"not an image at all", ASK, "corrupt_image"),
    "bomb": (bomb_png(), ASK, "decompression_bomb"),
    "strip": (image_bytes(8, 800, fmt="PNG"), ASK, "extreme_aspect"),
    "unanswered": (image_bytes(), [ASK[0]], "malformed"),
    "roles": (image_bytes(), [ASK[1], ASK[0]], "malformed"),
    "nothing": (image_bytes(), [], "empty"),
    "blank": (image_bytes(), [ASK[0], {"from": "gpt", "value": "  "}], "empty"),
    "two_tags": (image_bytes(), [{"from": "human", "value": "<image> <image>"}, ASK[1]], "image_count_mismatch"),
    "types": (image_bytes(), [{"from": "human", "value": 7}, ASK[1]], "malformed"),
    "tag_in_reply": (image_bytes(), [ASK[0], {"from": "gpt", "value": "<image>"}], "malformed"),
}


def _llava_inputs(tmp_path, cases):
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (data, turns, _) in cases.items():
        record = {"id": name, "conversations": turns}
        if data is not None:
            (images / f"{name}.png").write_bytes(data)  # the extension is not what decides the decoder
            record["image"] = f"{name}.png"
        records.append(record)
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", images


def test_converter_and_loader_skip_the_same_samples_for_the_same_reasons(tmp_path, tokenizer):
    good = {"ok": (image_bytes(), ASK, None)}
    json_path, images = _llava_inputs(tmp_path, {**BAD, **good})
    writer = convert.convert_llava(str(json_path), str(images), str(tmp_path / "out"))
    skipped = [json.loads(line) for line in (tmp_path / "out" / SKIPPED_NAME).read_text().splitlines()]
    converter = {entry["id"]: entry["reason"] for entry in skipped}
    assert all(entry["detail"] for entry in skipped)  # each skip says what was wrong, not just a count
    assert writer.written == 1

    policy = ResolutionPolicy(64 * 64, 128 * 128, 512, multiple=16)
    decoder = SampleDecoder(tokenizer, policy, lambda h, w: (h // 16) * (w // 16), max_length=512)
    loader = {}
    for name, (data, turns, _) in {**BAD, **good}.items():  # the same samples, as any shard writer stores them
        body = {"conversations": turns, "images": [f"{name}.png"]}
        raw = {"__key__": name, "png": data, "json": json.dumps(body).encode()}
        try:
            decoder(raw)
        except SampleError as exn:
            loader[name] = exn.reason
    expected = {name: reason for name, (_, _, reason) in BAD.items()}
    assert converter == expected
    assert loader == expected


def test_the_check_fully_decodes_images_not_just_the_header():
    raw = {"__key__": "cut", "jpg": image_bytes(64, 64)[:300], "txt": b"a caption"}
    with pytest.raises(SampleError) as info:
        check_sample(raw)
    assert info.value.reason == "corrupt_image"
    assert check_sample({**raw, "jpg": image_bytes(64, 64)}).orig_sizes == [(64, 64)]


def test_empty_unknown_and_oversized_images_are_named_plainly():
    for data, reason, detail in [(b"", "corrupt_image", "empty image member (0 bytes)"),
                                 (b"GIF89a junk", "corrupt_image", "not an image format PIL can identify (11 bytes)"),
                                 (bomb_png(13_000, 13_000), "decompression_bomb", "13000x13000")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's own bomb warning is not printed beside our check
            with pytest.raises(SampleError) as info:
                check_sample({"__key__": "k", "png": data, "txt": b"a caption"}, max_image_pixels=100_000_000)
        assert (info.value.reason, info.value.detail[:len(detail)]) == (reason, detail)
        assert " at 0x" not in info.value.detail  # no object address


def _exit_message(args, capsys) -> tuple[object, str]:
    with pytest.raises(SystemExit) as info:
        convert.main(args)
    err = capsys.readouterr().err
    return info.value.code, f"{info.value.code} {err}"


def test_converter_input_mistakes_fail_with_one_message_and_leave_no_folder(tmp_path, capsys):
    json_path, images = _llava_inputs(tmp_path, {"ok": (image_bytes(), ASK, None)})
    (tmp_path / "object.json").write_text(json.dumps({"id": "x", "conversations": ASK}))
    (tmp_path / "broken.json").write_text('[{"id": ')
    all_bad, _ = _llava_inputs(tmp_path / "bad", {k: BAD[k] for k in ("cut", "nothing")})
    out = tmp_path / "out"
    cases = [
        (["--json", str(tmp_path / "object.json"), "--images", str(images)], "holds a JSON dict"),
        (["--json", str(tmp_path / "broken.json"), "--images", str(images)], "not valid JSON"),
        (["--json", str(tmp_path / "missing.json"), "--images", str(images)], "--json: no such file"),
        (["--json", str(json_path), "--images", str(tmp_path / "nowhere")], "--images: no such folder"),
        (["--json", str(json_path), "--images", str(json_path)], "--images: "),
        (["--json", str(images), "--images", str(images)], "--json: "),
        (["--json", str(all_bad), "--images", str(all_bad.parent / "images")], "every sample"),
        (["--json", str(json_path), "--images", str(images), "--shard-size", "0"], "--shard-size"),
        (["--images", str(images)], "--json"),
    ]
    for args, expected in cases:
        code, message = _exit_message(["llava", *args, "--out", str(out)], capsys)
        assert code not in (0, None), args
        assert expected in message, (args, message)
        assert "Traceback" not in message
        assert not out.exists(), f"{args} left {out} behind"
        assert sorted(os.listdir(tmp_path)) == sorted(["bad", "broken.json", "data.json", "images", "object.json"])
    code, message = _exit_message(["folder", "--images", str(tmp_path / "nowhere"), "--out", str(out)], capsys)
    assert code not in (0, None) and "--images: no such folder" in message and not out.exists()


def test_all_skipped_summary_names_the_samples(tmp_path, capsys):
    json_path, images = _llava_inputs(tmp_path, {k: BAD[k] for k in ("cut", "nothing")})
    code, message = _exit_message(["llava", "--json", str(json_path), "--images", str(images),
                                   "--out", str(tmp_path / "out")], capsys)
    assert "corrupt_image: 'cut'" in message and "empty: 'nothing'" in message


def test_output_folder_is_refused_or_replaced_whole(tmp_path, capsys, monkeypatch):
    cases = {f"s{i}": (image_bytes(seed=i), ASK, None) for i in range(3)}
    json_path, images = _llava_inputs(tmp_path, cases)
    out = tmp_path / "out"
    args = ["llava", "--json", str(json_path), "--images", str(images), "--out", str(out), "--shard-size", "1"]
    convert.main(args)
    assert "converted 3 samples into 3 shards" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    code, message = _exit_message(args, capsys)  # a second conversion into the same folder
    assert code not in (0, None) and "--overwrite" in message and "not empty" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # a crash in the middle of an --overwrite conversion: the old set stays, whole, and nothing else is left
    original = convert.ShardSetWriter.write
    calls = {"n": 0}

    def crash(self, sample, sizes):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, sample, sizes)

    monkeypatch.setattr(convert.ShardSetWriter, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        convert.main([*args, "--overwrite"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "images", "out"]

    # --overwrite with a smaller set: the new set replaces the old one whole (no stale shard-000002.tar)
    (images / "s2.png").unlink()
    convert.main([*args, "--overwrite"])
    assert "converted 2 samples into 2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar",
                                                     SKIPPED_NAME]
    assert json.loads((out / SKIPPED_NAME).read_text())["reason"] == "missing_image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "images", "out"]


def test_shard_specs_are_checked_and_typed_paths_never_filled(tmp_path):
    json_path, images = _llava_inputs(tmp_path, {"ok": (image_bytes(), ASK, None)})
    convert.convert_llava(str(json_path), str(images), str(tmp_path / "shards"))
    tar = str(tmp_path / "shards" / "shard-000000.tar")
    assert resolve_shards(tar) == [tar]  # a single .tar file
    assert resolve_shards(str(tmp_path / "shards")) == [tar]
    assert resolve_shards([tar, str(tmp_path / "shards")]) == [tar, tar]
    cases = [
        (str(tmp_path / "typo"), "no such file or folder"),
        (str(tmp_path / "typo" / "shard-{000000..000003}.tar"), "matches no file"),
        (str(tmp_path / "shards" / "shard-{000000..000001}.tar"), "1 of the 2 shards"),
        (str(json_path), "python -m datamodules.convert"),
        (str(images), "holds no .tar shards"),
        (str(images / "ok.png"), "is not a .tar shard"),
        ([], "non-empty list"),
        ("synthetic:shapes,n=4", "unknown synthetic task"),
        ("synthetic:shapegrid,n=4,colour=3", "expected name=value"),
        ("synthetic:shapegrid", "positive sample count"),
    ]
    for spec, expected in cases:
        with pytest.raises(SettingsError) as info:
            resolve_shards(spec, "data.val_shards", str(tmp_path / "generated"))
        assert str(info.value).startswith("data.val_shards: ") and expected in str(info.value), (spec, info.value)
    assert sorted(os.listdir(tmp_path)) == ["data.json", "images", "shards"]  # no folder named after a pattern


def test_generated_data_only_when_asked_for_by_name(tmp_path, tokenizer):
    root = str(tmp_path / "generated")
    spec = "synthetic:shapegrid,n=6,seed=2,min_side=64,max_side=96"
    typo = str(tmp_path / "my_data")
    dm = UHDDataModule(train_shards=typo, val_shards=spec, tokenizer=tokenizer, synthetic_root=root, **SMALL)
    dm.prepare_data()
    assert os.listdir(root) == [os.path.basename(synthetic_dir(spec, root))]
    assert not os.path.exists(typo)  # a typed path is never filled with generated data
    with pytest.raises(SettingsError, match="data.train_shards: no such file or folder"):
        dm.setup("fit")
    dm.setup("validate")
    assert sum(len(b["keys"]) for b in dm.val_dataloader()) == 6
    with pytest.raises(SettingsError, match="data.synthetic"):  # a dict of generator settings is refused by name
        UHDDataModule(train_shards=typo, synthetic={"train": {"task": "shapegrid", "n": 4}}).prepare_data()


def test_training_on_nothing_or_on_too_little_fails_with_counts():
    dm = UHDDataModule(train_shards="x", max_skip_fraction=0.1)
    with pytest.raises(SettingsError, match="no usable training sample"):
        dm.check_training_data(0, {"corrupt_image": 5})
    with pytest.raises(SettingsError, match=r"2 of 10 samples skipped \(20% > data.max_skip_fraction 10%\): "
                                            r"bad_json: 1, corrupt_image: 1"):
        dm.check_training_data(8, {"corrupt_image": 1, "bad_json": 1})
    dm.check_training_data(9, {"corrupt_image": 1, "epoch_overflow": 50})  # overflow is no data fault
    for name, value in (("max_skip_fraction", 1.5), ("batch_token_budget", -5), ("max_batch_size", 0)):
        with pytest.raises(SettingsError, match=f"data.{name}"):
            UHDDataModule(train_shards="x", **{name: value}).check_settings("")


def test_loader_skips_name_the_sample(tmp_path, tokenizer, caplog):
    from .conftest import conversation, write_shards

    samples = [{"__key__": f"junk{i}", "jpg": b"junk", "json": conversation()} for i in range(7)]
    write_shards(tmp_path, samples, sizes=[[(64, 64)]] * 7)
    dm = UHDDataModule(train_shards=str(tmp_path), tokenizer=tokenizer, **SMALL)
    with caplog.at_level(logging.WARNING, logger="datamodules.samples"):
        assert list(dm.train_dataloader()) == []
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped corrupt_image: junk")]
    assert len(named) == 5 and "further ones at DEBUG level" in named[-1]  # named, but not a flood
