"""The ablate command end to end on tiny data (2 steps per config); every ablation overlay changes one setting."""

import csv
import json
from pathlib import Path

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


def test_ablate_pooling_writes_one_row_per_config(tmp_path):
    out = tmp_path / "out"
    args = [
        "ablate", "--set", "pooling", "--steps", "2", "--out", str(out), "--runs", str(tmp_path / "runs"),
        "--data", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tokenizer"),
        "--grid", "2", "--min-side", "112", "--max-side", "112", "--train-samples", "16", "--test-samples", "2",
        "--fit-arg=--trainer.enable_progress_bar=false", "--fit-arg=--trainer.enable_model_summary=false",
    ]
    assert main(args) == 0
    for suffix in ("csv", "json", "md", "png"):
        assert (out / f"ablate_pooling.{suffix}").is_file(), suffix
    assert (out / "ablate_pooling_loss.png").is_file()
    with open(out / "ablate_pooling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == list(SETS["pooling"])
    assert [r["pooling"] for r in rows] == ["avg", "content_adaptive", "pixel_unshuffle"]
    assert all(float(r["encoder_gflops"]) > 0 and int(r["image_tokens"]) > 0 for r in rows)
    assert all(r["learned_at_step"] == "" for r in rows)  # 2 steps: nothing learned (and no loss logged)
    info = json.loads((out / "ablate_pooling.json").read_text())
    assert len(info["results"]) == 3
    assert info["chance"] == 1 / 4  # "where" on a 2x2 grid
