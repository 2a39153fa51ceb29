"""The pilot command end to end on tiny data (2 steps per encoder), and the slice-boundary geometry it reports."""

import csv
import json

import numpy as np
import pytest

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.pilot import ENCODERS, PilotData, chance, cut_mask, learned_at, loss_curve, pilot_sample


def tiny_args(tmp_path, *extra):
    return [
        "pilot", "--steps", "2", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
        "--data", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tokenizer"),
        "--grid", "2", "--min-side", "112", "--max-side", "120", "--train-samples", "16", "--test-samples", "4",
        "--fit-arg=--trainer.enable_progress_bar=false", "--fit-arg=--trainer.enable_model_summary=false", *extra,
    ]


def test_pilot_writes_one_row_and_one_heatmap_per_encoder(tmp_path):
    assert main(tiny_args(tmp_path)) == 0
    out = tmp_path / "out"
    for name in ("pilot.csv", "pilot_cells.csv", "pilot.json", "pilot.md", "pilot.png", "pilot_loss.png"):
        assert (out / name).is_file(), name
    with open(out / "pilot.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["encoder"] for r in rows] == list(ENCODERS)
    assert [r["projector"] for r in rows] == ["merger", "merger", "mlp"]
    assert all(int(r["steps"]) == 2 and int(r["questions"]) == 4 for r in rows)
    info = json.loads((out / "pilot.json").read_text())
    for name in ENCODERS:
        assert np.asarray(info["cells"][name], dtype=float).shape == (2, 2)
    assert len((out / "pilot.md").read_text().splitlines()) == 2 + len(ENCODERS)

    # a second call with --reuse evaluates the saved runs instead of training again
    before = {name: json.loads(next((tmp_path / "runs" / name).glob("*/pilot_train.json")).read_text())
              for name in ("gne",)}
    assert main(tiny_args(tmp_path, "--reuse", "--encoders", "gne", "--out", str(tmp_path / "again"))) == 0
    with open(tmp_path / "again" / "pilot.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["encoder"] for r in again] == ["gne"]
    assert float(again[0]["train_s"]) == pytest.approx(before["gne"]["train_s"], abs=0.1)


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
