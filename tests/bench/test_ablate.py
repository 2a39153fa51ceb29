"""The ablate command end to end on tiny data (2 steps per config); every ablation overlay changes one setting."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.ablate import SETS

ABLATIONS = Path(__file__).resolve().parents[2] / "configs" / "ablations"


def test_every_overlay_sets_one_encoder_setting():
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted(n for names in SETS.values() for n in names)
    keys = {"pooling": "wtc_pooling", "placement": "wtc_layers", "patch": "patch_size"}
    for set_name, names in SETS.items():
        for name in names:
            overlay = yaml.safe_load((ABLATIONS / f"{name}.yaml").read_text())
            assert list(overlay["model"]["init_args"]) == [keys[set_name]], name


def args(tmp_path, *extra):
    return [
        "ablate", "--set", "pooling", "--configs", "pooling_avg", "--steps", "2", "--out", str(tmp_path / "out"),
        "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok"),
        "--grid", "2", "--min-side", "112", "--max-side", "112", "--train-samples", "16", "--test-samples", "2",
        "--fit-arg=--trainer.enable_progress_bar=false", "--fit-arg=--trainer.enable_model_summary=false", *extra,
    ]


@pytest.mark.slow
def test_ablate_writes_a_row_per_config_with_cost_and_seed_records(tmp_path):
    out = tmp_path / "out"
    assert main(args(tmp_path)) == 0
    stem = "ablate_pooling_where"
    for suffix in (".csv", "_seeds.csv", ".json", ".md", ".png", "_loss.png"):
        assert (out / f"{stem}{suffix}").is_file(), suffix
    with open(out / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["pooling_avg"] and rows[0]["pooling"] == "avg"
    assert float(rows[0]["encoder_gflops"]) > 0 and int(rows[0]["image_tokens"]) > 0
    assert rows[0]["learned_runs"] == "0"  # 2 steps: nothing learned, counted as such
    info = json.loads((out / f"{stem}.json").read_text())
    assert info["chance"] == 1 / 4 and info["seeds"] == [0]  # "where" on a 2x2 grid, one seed by default
    record = json.loads((out / "seeds" / stem / "pooling_avg_seed0.json").read_text())
    assert record["set"] == "pooling" and record["seed"] == 0 and record["config_hash"] and record["commit"]


def test_ablate_rejects_a_config_outside_the_set(tmp_path, capsys):
    assert main(args(tmp_path, "--configs", "patch10")) == 2
    assert "patch10 not in set pooling" in capsys.readouterr().err
