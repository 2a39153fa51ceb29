import math

import pytest
import torch

from llava_uhd.metrics import ANLS, VQAAccuracy, VQAMetrics, anls_scores, normalize_answer, plot_cell_accuracy


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Two red circles.", "2 red circles"),
        ("  A  red   circle ", "red circle"),
        ("an apple", "apple"),
        ("None", "0"),
        ("twelve", "12"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("don't", "dont"),
        ("red-circle!", "red circle"),
        ("Row 3, column 4", "row 3 column 4"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_accuracy_with_several_answers():
    metric = VQAAccuracy()
    metric.update(["Three", "a blue square", "circle"], ["3", ["blue square", "square"], "red circle"])
    assert metric.compute().item() == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("apple", "apple", 1.0),
        ("Apple ", "apple", 1.0),  # lowercased, whitespace collapsed
        ("aple", "apple", 1 - 1 / 5),  # one deletion
        ("appel", "apple", 1 - 2 / 5),  # two substitutions
        ("kitten", "sitting", 1 - 3 / 7),
        ("abcde", "abxyz", 0.0),  # NL = 0.6 >= 0.5
        ("xyz", "apple", 0.0),
        ("colr", ["colour", "color"], 1 - 1 / 5),  # best of the answers: color (1 edit / 5) beats colour (2 / 6)
        ("colour", ["color", "colour"], 1.0),
        ("", "", 1.0),
    ],
)
def test_anls_hand_computed(prediction, answers, expected):
    assert anls_scores([prediction], [answers])[0].item() == pytest.approx(expected)


def test_anls_metric_averages():
    metric = ANLS()
    metric.update(["aple", "xyz"], ["apple", "apple"])
    metric.update(["apple"], [["pear", "apple"]])
    assert metric.compute().item() == pytest.approx((0.8 + 0.0 + 1.0) / 3)


def _grid_meta(task, answer, row, col, rows=3, cols=4):
    return {"task": task, "answer": answer, "row": row, "col": col, "rows": rows, "cols": cols, "kind": "position"}


def test_per_task_and_per_cell_accumulation():
    metric = VQAMetrics()
    metric.update(
        ["red circle", "blue star", "apple", "3", "a red circle on a white background."],
        [
            _grid_meta("shapegrid", "red circle", 1, 1),
            _grid_meta("shapegrid", "green star", 1, 1),
            _grid_meta("textgrid", "apple", 2, 2, rows=2, cols=2),
            {"task": "shapegrid", "answer": "3", "kind": "count", "positions": [[1, 1], [2, 3], [3, 4]]},
            {"task": "caption", "answer": "a red circle on a white background."},
        ],
    )
    metric.update(["green star"], [_grid_meta("shapegrid", "green star", 3, 4)])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(5 / 6)
    assert out["count"].item() == 6
    assert out["accuracy/shapegrid"].item() == pytest.approx(3 / 4)
    assert out["accuracy/textgrid"].item() == 1.0
    assert out["accuracy/caption"].item() == 1.0
    assert "accuracy/other" not in out
    cells = metric.cell_accuracy("shapegrid")
    assert cells.shape == (3, 4)  # the recorded grid size, not the 8 x 8 capacity
    assert cells[0, 0].item() == 0.5 and cells[2, 3].item() == 1.0
    assert int(torch.isnan(cells).sum()) == 10  # count questions carry no single cell
    assert metric.cell_accuracy("textgrid").shape == (2, 2)
    assert metric.cell_accuracy("caption").shape == (0, 0)
    assert metric.cell_tasks() == ["shapegrid", "textgrid"]
    logged = {f"val/{k}": v for k, v in out.items()}
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in logged.values())
    metric.reset()
    assert metric.total.sum().item() == 0


def test_unknown_task_and_grid_key():
    metric = VQAMetrics(tasks=("docvqa",), max_grid=(4, 4))
    metric.update(["x", "y"], [{"answer": "x", "task": "chartqa"}, {"answer": "y", "row": 2, "col": 1, "grid": (2, 3)}])
    out = metric.compute()
    assert out["accuracy/other"].item() == 1.0 and "accuracy/docvqa" not in out
    assert metric.cell_accuracy("other").shape == (2, 3)


def _feed(metric, samples):
    for predictions, metas in samples:
        metric.update(predictions, metas)


def test_ddp_style_merge_equals_single_object():
    from datamodules.synthetic import make_sample

    metas = [make_sample(task, i, seed=3, min_side=64, max_side=160)[3] for task in ("shapegrid", "textgrid")
             for i in range(6)]
    predictions = [m["answer"] if i % 3 else m["answer"] + "x" for i, m in enumerate(metas)]
    batches = [(predictions[i:i + 3], metas[i:i + 3]) for i in range(0, len(metas), 3)]
    single, rank0, rank1 = VQAMetrics(), VQAMetrics(), VQAMetrics()
    _feed(single, batches)
    _feed(rank0, batches[::2])
    _feed(rank1, batches[1::2])
    # simulate the all-reduce: every state gathered from both ranks and reduced with its dist_reduce_fx
    synced = VQAMetrics()
    for name, reduce in rank0._reductions.items():
        setattr(synced, name, reduce(torch.stack([getattr(rank0, name), getattr(rank1, name)])))
    synced._update_count = 1
    rank0.merge_state(rank1)
    expected = single.compute()
    for merged in (rank0, synced):
        out = merged.compute()
        assert out.keys() == expected.keys()
        for key in expected:
            assert torch.allclose(out[key], expected[key]), key
        for task in ("shapegrid", "textgrid"):
            assert torch.equal(merged.cell_accuracy(task).nan_to_num(-1), single.cell_accuracy(task).nan_to_num(-1))
    assert not math.isnan(expected["accuracy/textgrid"].item())


def test_heatmap_figure(tmp_path):
    cells = torch.tensor([[1.0, float("nan")], [0.25, 0.0]])
    fig = plot_cell_accuracy(cells, "shapegrid")
    fig.savefig(tmp_path / "cells.png")
    assert (tmp_path / "cells.png").stat().st_size > 0
    assert len(fig.axes[0].texts) == 3
