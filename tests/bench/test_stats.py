"""Seed statistics on hand-checked numbers: mean / sample std, Wilson intervals, never-learned runs counted."""

import math

import pytest

from llava_uhd.bench.stats import interval_cell, learned_cell, mean_pm, mean_std, summarize, wilson


def test_mean_and_sample_std():
    # 0.5, 0.7, 0.9: mean 0.7, deviations -0.2, 0, 0.2 -> variance 0.08 / 2 = 0.04 -> std 0.2
    mean, std = mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)
    assert mean_std([0.25]) == (0.25, None)  # one seed: no spread to report
    assert mean_std([]) == (None, None)
    assert mean_pm(0.7, 0.2) == "0.700 ± 0.200" and mean_pm(0.25, None) == "0.250"


def test_wilson_interval_matches_hand_computation():
    # 50 of 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 0.96^2 / 40000) / 1.0384 = 0.0962
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    # 0 of 10: lower bound 0, upper z^2/n / (1 + z^2/n) = 0.38415 / 1.38415
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.38415 / 1.38415, abs=1e-4)
    # 10 of 10 mirrors it
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.38415 / 1.38415, abs=1e-4)
    assert wilson(0, 0) == (None, None)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)


def row(accuracy, learned, cut, uncut):
    return {"accuracy": accuracy, "learned_at_step": learned, "cut_correct": cut[0], "cut_total": cut[1],
            "uncut_correct": uncut[0], "uncut_total": uncut[1]}


def test_summary_counts_runs_that_never_learned_apart():
    rows = [row(1.0, 200, (50, 50), (40, 40)), row(0.6, None, (20, 50), (30, 40)), row(1.0, 400, (50, 50), (40, 40))]
    s = summarize(rows, "sbe")
    assert s["seeds"] == 3 and s["learned_runs"] == 2
    assert s["learned_at_mean"] == pytest.approx(300) and s["learned_at_std"] == pytest.approx(math.sqrt(20000))
    assert s["accuracy_mean"] == pytest.approx(2.6 / 3)
    assert s["accuracy_cut"] == pytest.approx(120 / 150) and s["cut_questions"] == 150
    assert s["accuracy_uncut"] == pytest.approx(110 / 120)
    assert (s["accuracy_cut_lo"], s["accuracy_cut_hi"]) == pytest.approx(wilson(120, 150))
    assert learned_cell(s) == "300 ± 141 (2/3 learned)"
    assert interval_cell(s, "cut").startswith("0.800 [")
    never = summarize([row(0.1, None, (1, 10), (1, 8))] * 2, "x")
    assert never["learned_at_mean"] is None and learned_cell(never) == "not reached (0/2)"
