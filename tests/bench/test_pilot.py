"""The pilot command end to end on tiny data (seeds, --reuse, determinism), and the slice-cut geometry it reports."""

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from datamodules.synthetic import PILOT_SHAPE_PAD, SHAPES, cell_box
from llava_uhd.bench import pilot
from llava_uhd.bench.__main__ import main
from llava_uhd.bench.pilot import (
    MANIFEST,
    PilotData,
    chance,
    cut_by_slices,
    cut_mask,
    data_digest,
    learned_at,
    loss_curve,
    pilot_sample,
    read_samples,
    write_pilot_data,
)


def tiny_args(tmp_path, *extra):
    return [
        "pilot", "--steps", "3", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
        "--data", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tokenizer"), "--encoders", "pvc",
        "--grid", "2", "--min-side", "112", "--max-side", "120", "--train-samples", "16", "--test-samples", "4",
        "--seeds", "2", "--jobs", "2", "--fit-arg=--trainer.log_every_n_steps=1",
        "--fit-arg=--trainer.enable_model_summary=false", *extra,
    ]


def result(tmp_path, seed):
    return json.loads((tmp_path / "runs" / "where" / "pvc" / f"seed{seed}" / "result.json").read_text())


@pytest.mark.slow
def test_pilot_seeds_reuse_and_identical_losses(tmp_path, capsys, monkeypatch):
    # other work may commit while this runs: pin the code version the runs are checked against
    version = {"commit": "c" * 40, "dirty": False, "diff_sha": ""}
    monkeypatch.setattr("llava_uhd.bench.pilot.code_version", lambda: version)
    assert main(tiny_args(tmp_path)) == 0  # two seeds side by side
    out = tmp_path / "out"
    for name in ("pilot_where.csv", "pilot_where_seeds.csv", "pilot_where_cells.csv", "pilot_where.json",
                 "pilot_where.md", "pilot_where.png", "pilot_where_spread.png", "pilot_where_loss.png"):
        assert (out / name).is_file(), name
    with open(out / "pilot_where.csv") as f:
        arms = list(csv.DictReader(f))
    assert [a["name"] for a in arms] == ["pvc"] and arms[0]["seeds"] == "2"
    with open(out / "pilot_where_seeds.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]
    first = [result(tmp_path, seed) for seed in (0, 1)]
    for seed, record in enumerate(first):
        assert record["commit"] == "c" * 40 and len(record["config_hash"]) == 16 and record["threads"] == 1
        assert record["seed"] == seed and record["questions"] == 4 and not record["reused"]
        assert len(record["loss_curve"]) == 3 and record["train_s"] > 0
        copy = json.loads((out / "seeds" / "pilot_where" / f"pvc_seed{seed}.json").read_text())
        assert copy["config_hash"] == record["config_hash"]
    assert first[0]["config_hash"] != first[1]["config_hash"]  # the seed is a setting
    assert first[0]["loss_curve"] != first[1]["loss_curve"]  # ... and changes the run

    # matching commit and config hash: re-scored, not trained
    capsys.readouterr()
    assert main(tiny_args(tmp_path, "--reuse", "--jobs", "1")) == 0
    err = capsys.readouterr().err
    assert "reuse pvc seed 0: reused" in err and "reuse pvc seed 1: reused" in err
    assert result(tmp_path, 0)["reused"] and result(tmp_path, 0)["train_s"] == first[0]["train_s"]

    # another commit (or another config hash, see test_runs): refused, trained again -> the same losses
    version["commit"] = "d" * 40
    assert main(tiny_args(tmp_path, "--reuse", "--seeds", "0", "0", "--jobs", "1")) == 0
    err = capsys.readouterr().err
    assert "reuse pvc seed 0: refused, training again (recorded commit cccccccccc != current dddddddddd)" in err
    again = result(tmp_path, 0)
    assert not again["reused"] and again["commit"] == "d" * 40
    assert again["loss_curve"] == first[0]["loss_curve"]  # bit-identical, step by step


def test_bad_options_give_one_message(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--seeds", "0")) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(tiny_args(tmp_path, "--min-side", "130")) == 2
    assert "--min-side" in capsys.readouterr().err
    for bad in (["--jobs", "0"], ["--seeds", "x"], ["--task", "wher"]):
        with pytest.raises(SystemExit) as exit_info:
            main(tiny_args(tmp_path, *bad))
        assert exit_info.value.code == 2


def test_sbe_slice_boundaries_cut_the_middle_row_and_column():
    # 224 px squares -> 2x2 slices of 112 px: the boundaries at 112 px cross the middle cell of a 3x3 grid
    mask = cut_mask(PilotData(grid=3, min_side=224, max_side=224))
    assert mask.tolist() == [[False, True, False], [True, True, True], [False, True, False]]
    # an even grid has its cell edges on the boundary: no shape is cut
    assert not cut_mask(PilotData(grid=2, min_side=224, max_side=224)).any()


def test_where_samples_hold_one_shape_in_the_answered_cell():
    spec = PilotData(grid=3, min_side=224, max_side=224)
    assert spec.question == "where"
    seen = set()
    for index in range(24):
        image, question, answer, meta = pilot_sample(index, 0, spec)
        assert answer == f"row {meta['row']}, column {meta['col']}" and question.endswith("<image>")
        ink = np.asarray(image.convert("L")) < 200
        rows, cols = np.nonzero(ink)
        cell = 224 / 3
        # all the ink lies in the answered cell (JPEG-free PIL image: no ringing)
        assert ink.sum() > 100
        assert rows.min() >= (meta["row"] - 1) * cell and rows.max() < meta["row"] * cell
        assert cols.min() >= (meta["col"] - 1) * cell and cols.max() < meta["col"] * cell
        seen.add((meta["row"], meta["col"]))
    assert len(seen) >= 7  # places spread over the grid
    assert chance(spec) == pytest.approx(1 / 9)


def test_kind_samples_put_the_shape_across_the_slice_cut_in_cut_cells():
    spec = PilotData(grid=3, min_side=224, max_side=224, question="kind")
    assert chance(spec) == pytest.approx(1 / len(SHAPES))
    cut_line = 112  # the tiny SBE's 2x2 slices of 112 px meet here
    seen = {True: 0, False: 0}
    for index in range(40):
        image, question, answer, meta = pilot_sample(index, 5, spec)
        assert answer == meta["shape"] and answer in SHAPES and question.endswith("<image>")
        ink = np.asarray(image.convert("L")) < 200
        ys, xs = np.nonzero(ink)
        cut = cut_by_slices(meta)
        assert cut == (meta["row"] == 2 or meta["col"] == 2)
        seen[cut] += 1
        box = cell_box(224, 224, 3, 3, meta["row"] - 1, meta["col"] - 1, PILOT_SHAPE_PAD)
        for centre_band, pixels, centre in ((meta["row"] == 2, ys, (box[1] + box[3]) / 2),
                                            (meta["col"] == 2, xs, (box[0] + box[2]) / 2)):
            if centre_band:
                # the shape is centred on the cut and straddles it: a good part of its ink on either side
                assert centre == pytest.approx(cut_line)
                assert min((pixels < cut_line).mean(), (pixels >= cut_line).mean()) > 0.25
            else:
                assert pixels.max() < cut_line or pixels.min() >= cut_line  # inside one slice along this axis
    assert seen[True] >= 10 and seen[False] >= 5
    # train and held-out samples of one seed differ; the same arguments give the same image
    train, test = pilot_sample(0, 5, spec, "train")[0], pilot_sample(0, 5, spec, "test")[0]
    assert not np.array_equal(np.asarray(train), np.asarray(test))
    assert np.array_equal(np.asarray(train), np.asarray(pilot_sample(0, 5, spec)[0]))


def test_position_samples_are_deterministic_and_answer_the_colour():
    spec = PilotData(grid=3, min_side=224, max_side=224, question="position")
    image, question, answer, meta = pilot_sample(3, 0, spec)
    again = pilot_sample(3, 0, spec)
    assert np.array_equal(np.asarray(image), np.asarray(again[0])) and (question, answer) == again[1:3]
    assert image.size == (224, 224) and meta["rows"] == meta["cols"] == 3
    assert f"row {meta['row']}, column {meta['col']}" in question and " " not in answer
    assert question.endswith("<image>")  # question first: image tokens can attend to it


def test_marked_samples_frame_the_asked_cell():
    spec = PilotData(grid=3, min_side=224, max_side=224, question="marked")
    for index in range(8):
        image, question, answer, meta = pilot_sample(index, 0, spec)
        assert "black frame" in question and answer != "black"
        # the frame's top edge: dark pixels at the asked cell's top border, none where no frame is drawn
        pixels = np.asarray(image.convert("L"))
        cell = 224 / 3
        y, x = int((meta["row"] - 1 + 0.05) * cell) + 1, int((meta["col"] - 0.5) * cell)
        assert pixels[y, x] < 80
    with pytest.raises(ValueError, match="question"):
        pilot_sample(0, 0, PilotData(question="count"))
    with pytest.raises(ValueError, match="split"):
        pilot_sample(0, 0, spec, "val")


def test_learned_at_reads_the_logged_loss_and_needs_a_steady_drop(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    losses = [3.0, 0.4, 0.37, 0.02, 0.3, 0.04, 0.01, 0.008, 0.005, 0.004]  # a dip at step 30, steady from 50
    with SummaryWriter(str(tmp_path)) as writer:
        for i, value in enumerate(losses):
            writer.add_scalar("train/loss", value, i * 10)
            writer.add_scalar("train/lm_loss", 9.0, i * 10)
    curve = loss_curve(tmp_path)
    assert [step for step, _ in curve] == [i * 10 for i in range(len(losses))]
    assert [v for _, v in curve] == pytest.approx(losses)
    assert learned_at(curve) == 50
    assert learned_at(curve, threshold=0.001) is None
    assert loss_curve(tmp_path / "empty") == []


TINY = PilotData(grid=2, min_side=64, max_side=64, train=6, test=3, seed=1)


def shard_times(paths):
    return {split: [p.stat().st_mtime_ns for p in sorted(Path(paths[split]).glob("*.tar"))] for split in paths}


def test_pilot_data_is_kept_only_while_spec_generator_and_bytes_match(tmp_path, monkeypatch):
    root = tmp_path / "where" / "seed1"
    paths = write_pilot_data(TINY, root)
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["spec"]["seed"] == 1 and manifest["generator"] == pilot.generator_digest()
    assert manifest["hashes"] == data_digest(paths)
    written = shard_times(paths)
    assert write_pilot_data(TINY, root) == paths and shard_times(paths) == written  # kept: nothing rewritten

    # the generator's code changed (the settings did not): written again by the current generator
    monkeypatch.setattr(pilot, "generator_digest", lambda: "changed")
    write_pilot_data(TINY, root)
    assert shard_times(paths) != written and json.loads((root / MANIFEST).read_text())["generator"] == "changed"
    monkeypatch.undo()
    write_pilot_data(TINY, root)
    assert json.loads((root / MANIFEST).read_text())["hashes"] == manifest["hashes"]  # the same bytes again

    # other settings: written again, other bytes
    other = write_pilot_data(PilotData(**{**asdict(TINY), "train": 5}), root)
    assert data_digest(other)["train"] != manifest["hashes"]["train"]
    write_pilot_data(TINY, root)

    # shards changed behind the manifest's back (a half-written or edited set): written again
    shard = next(Path(paths["train"]).glob("*.tar"))
    shard.write_bytes(shard.read_bytes()[:-2048])
    assert write_pilot_data(TINY, root) == paths and data_digest(paths) == manifest["hashes"]


def test_an_older_layouts_stamp_is_not_trusted(tmp_path):
    # what the earlier code left: spec.json naming the same spec, beside shards an older generator wrote
    root = tmp_path / "where" / "seed1"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        (root / split / "pilot-old-000000.tar").write_bytes(b"\0" * 1024)
    (root / "spec.json").write_text(json.dumps(asdict(TINY)))
    paths = write_pilot_data(TINY, root)
    assert not (root / "spec.json").exists() and (root / MANIFEST).is_file()
    assert not list(Path(paths["train"]).glob("pilot-old-*"))
    assert data_digest(paths) == data_digest(write_pilot_data(TINY, tmp_path / "fresh"))


def test_the_held_out_set_is_scored_from_the_shards_bytes(tmp_path):
    paths = write_pilot_data(TINY, tmp_path / "data")
    samples = list(read_samples(Path(paths["test"])))
    assert len(samples) == TINY.test
    for i, sample in enumerate(samples):
        image, question, answer, meta = pilot_sample(i, TINY.seed, TINY, "test")
        turns = sample["json"]["conversations"]
        assert (turns[0]["value"], turns[1]["value"], sample["json"]["meta"]) == (question, answer, meta)
        assert sample["jpg"] == pilot._jpeg(image, TINY.quality)
