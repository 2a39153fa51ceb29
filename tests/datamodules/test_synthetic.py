import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from datamodules import synthetic
from datamodules.shards import expand_shards


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_deterministic_sizes_and_exact_answers(task):
    for i in range(24):
        image, question, answer, meta = synthetic.make_sample(task, i, seed=3, min_side=64, max_side=256)
        again = synthetic.make_sample(task, i, seed=3, min_side=64, max_side=256)
        assert again[1:] == (question, answer, meta) and again[0].tobytes() == image.tobytes()
        assert 64 <= image.height <= 256 and 64 <= image.width <= 256
        assert 1 / 4 - 1e-3 <= image.height / image.width <= 4 + 1e-3
        assert meta["task"] == task and meta["question"] == question and meta["answer"] == answer and answer
        if meta["kind"] in ("position", "ocr"):
            assert 1 <= meta["row"] <= meta["rows"] and 1 <= meta["col"] <= meta["cols"]
            assert f"row {meta['row']}, column {meta['col']}" in question
        if meta["kind"] == "count":
            assert answer == str(len(meta["positions"])) and all(len(p) == 2 for p in meta["positions"])
        if meta["kind"] == "caption":
            assert [o["col"] for o in meta["objects"]] == list(range(1, len(meta["objects"]) + 1))
    other = [synthetic.make_sample(task, i, seed=4, min_side=64, max_side=256)[0].tobytes() for i in range(4)]
    assert other != [synthetic.make_sample(task, i, seed=3, min_side=64, max_side=256)[0].tobytes() for i in range(4)]


def test_default_sizes_span_256_to_1536_and_1_4_to_4_1():
    sizes = [synthetic._size(np.random.default_rng(i), 256, 1536) for i in range(400)]
    assert all(256 <= s <= 1536 for hw in sizes for s in hw)
    ratios = [math.log(h / w) for h, w in sizes]
    assert min(ratios) < math.log(1 / 2.5) and max(ratios) > math.log(2.5)
    assert all(abs(r) <= math.log(4) + 1e-3 for r in ratios)


def test_cli_writes_shards_and_index(tmp_path, capsys):
    synthetic.main(["--task", "textgrid", "--n", "10", "--out", str(tmp_path), "--seed", "1",
                    "--min-side", "64", "--max-side", "128", "--shard-size", "4"])
    assert "converted 10 textgrid samples into 3 shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]
    assert len(expand_shards(str(tmp_path))) == 3
    first = index["shards"][0]["image_sizes"][0][0]
    with tarfile.open(tmp_path / index["shards"][0]["name"]) as tar:
        names = tar.getnames()
        image = Image.open(tar.extractfile(names[1 if names[1].endswith(".jpg") else 0]))
        assert [image.height, image.width] == first
    assert names[:2] == ["textgrid00000000.jpg", "textgrid00000000.json"]


@pytest.mark.parametrize("extra, message", [
    (["--n", "-4"], "argument --n: must be at least 1, got -4"),
    (["--n", "4", "--shard-size", "0"], "argument --shard-size: must be at least 1, got 0"),
    (["--n", "4", "--min-side", "8"], "--min-side / --max-side: need 16 <= min-side <= max-side"),
])
def test_cli_mistakes_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "new"
    with pytest.raises(SystemExit) as info:
        synthetic.main(["--task", "shapegrid", "--out", str(out), *extra])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_a_folder_that_holds_a_shard_set(tmp_path, capsys):
    args = ["--task", "shapegrid", "--n", "2", "--out", str(tmp_path), "--min-side", "32", "--max-side", "32"]
    synthetic.main(args)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as info:
        synthetic.main([*args[:1], "caption", *args[2:]])  # a second set into the same folder: a mixed set
    assert info.value.code == 2 and "is not a new or empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_module_runs_as_a_script_without_runpy_warning(tmp_path):
    """``python -m datamodules.synthetic``: the package must not import the module before runpy runs it."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "datamodules.synthetic", "--task",
                          "shapegrid", "--n", "2", "--out", str(tmp_path / "s"), "--min-side", "64",
                          "--max-side", "64"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RuntimeWarning" not in run.stderr and expand_shards(str(tmp_path / "s"))
