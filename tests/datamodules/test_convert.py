import json

from PIL import Image

from datamodules import convert
from datamodules.datamodule import UHDDataModule

from .conftest import SMALL, bomb_png, image_bytes


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_llava_converter_counts_and_reasons(tmp_path, tokenizer, capsys):
    images = tmp_path / "images"
    _write(images / "a.jpg", image_bytes(64, 96))
    _write(images / "sub" / "b.png", image_bytes(80, 64, fmt="PNG"))
    _write(images / "c.jpg", image_bytes(64, 64)[:200])  # truncated: header readable, verify fails
    _write(images / "bomb.png", bomb_png())
    _write(images / "junk.jpg", b"not an image")
    turn = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]
    records = [
        {"id": "a", "image": "a.jpg", "conversations": turn},
        {"id": "b.1", "image": "sub/b.png", "conversations": [{"from": "human", "value": "Hi"}, turn[1]]},
        {"id": "two", "images": ["a.jpg", "sub/b.png"],
         "conversations": [{"from": "human", "value": "<image> and <image>?"}, turn[1]]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "gone", "image": "nope.jpg", "conversations": turn},
        {"id": "bomb", "image": "bomb.png", "conversations": turn},
        {"id": "junk", "image": "junk.jpg", "conversations": turn},
        {"id": "empty", "image": "a.jpg", "conversations": []},
        {"id": "bad", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "x"}]},
        {"id": "mismatch", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}, turn[1]]},
        "not a record",
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    convert.main(["llava", "--json", str(tmp_path / "data.json"), "--images", str(images),
                  "--out", str(tmp_path / "out"), "--shard-size", "2"])
    out = capsys.readouterr().out
    assert "converted 4 samples into 2 shards" in out and "skipped 7" in out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == {"missing_image": 1, "decompression_bomb": 1, "corrupt_image": 1, "empty": 1,
                                "malformed": 2, "image_count_mismatch": 1}
    assert index["shards"][1]["image_sizes"] == [[[64, 96], [80, 64]], []]

    dm = UHDDataModule(train_shards=str(tmp_path / "out"), tokenizer=tokenizer, **SMALL, shard_shuffle=False)
    keys, per_sample = [], []
    for batch in dm.train_dataloader():
        keys += batch["keys"]
        per_sample += batch["images_per_sample"]
    assert sorted(zip(keys, per_sample)) == [("000000000_a", 1), ("000000001_b_1", 1), ("000000002_two", 2),
                                             ("000000003_text", 0)]
    assert dm.skip_counts == {}


def test_folder_converter(tmp_path, capsys):
    images = tmp_path / "imgs"
    _write(images / "x.jpg", image_bytes(64, 64))
    _write(images / "x.txt", b"a red square")
    _write(images / "deep" / "y.png", image_bytes(64, 128, fmt="PNG"))
    _write(images / "deep" / "y.txt", b"a blue circle")
    _write(images / "lonely.jpg", image_bytes(64, 64))
    _write(images / "orphan.txt", b"no image")
    _write(images / "blank.jpg", image_bytes(64, 64))
    _write(images / "blank.txt", b"  ")
    convert.main(["folder", "--images", str(images), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "converted 2 samples" in out and "skipped 3 (empty: 1, missing_image: 1, no_text: 1)" in out
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["shards"][0]["image_sizes"] == [[[64, 128]], [[64, 64]]]
    assert Image.open(tmp_path / "imgs" / "x.jpg").size == (64, 64)
