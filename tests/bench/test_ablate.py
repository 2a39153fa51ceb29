"""The ablate command end to end on tiny data (2 steps per config); every ablation overlay changes one setting."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.ablate import PREALIGN_STAGE, SETS, ablation_configs, prealign_configs

ABLATIONS = Path(__file__).resolve().parents[2] / "configs" / "ablations"


SET_KEYS = {"pooling": {"wtc_pooling"}, "placement": {"wtc_layers"}, "patch": {"patch_size"},
            "prealign": {"zero_wtc_gate"}, "where-compress": {"wtc_layers", "wtc_pooling", "encoder", "projector"}}
"""The model settings each set's overlays may change (where-compress: where and how it compresses, or not at all)."""


def test_every_overlay_changes_only_what_its_set_studies():
    names = sorted(n for names in SETS.values() for n in names)
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted([*names, PREALIGN_STAGE.stem])
    for set_name, names in SETS.items():
        for name in names:
            overlay = yaml.safe_load((ABLATIONS / f"{name}.yaml").read_text())
            assert list(overlay) == ["model"] and set(overlay["model"]["init_args"]) <= SET_KEYS[set_name], name
    assert yaml.safe_load(PREALIGN_STAGE.read_text()) == {"model": {"class_path": "llava_uhd.stages.PreAlignment"}}


def test_prealign_on_configs_are_trained_after_a_prealignment_run():
    assert prealign_configs("prealign_off_live") == [] and prealign_configs("prealign_off_dead") == []
    assert prealign_configs("prealign_on_dead") == [*ablation_configs("prealign_on_dead"), PREALIGN_STAGE]


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


@pytest.mark.slow
def test_a_prealign_run_trains_stage_one_first_and_keeps_a_dead_gate_dead(tmp_path):
    from safetensors.torch import load_file

    argv = args(tmp_path)
    argv[argv.index("pooling")] = "prealign"
    argv[argv.index("pooling_avg")] = "prealign_on_dead"
    assert main([*argv, "--prealign-steps", "2"]) == 0
    run = tmp_path / "runs" / "where" / "prealign_on_dead" / "seed0"
    prealign = run / "prealign" / "stage1"
    assert (prealign / "export" / "model.safetensors").is_file()
    assert "llava_uhd.stages.PreAlignment" in (prealign / "config.yaml").read_text()
    command = json.loads((run / "fit_command.json").read_text())
    assert command[command.index("--model.init_from") + 1] == str(prealign / "export")
    gates = {k: v for k, v in load_file(str(run / "export" / "model.safetensors")).items()
             if ".wtc." in k and k.endswith("weight")}
    # W1 and W2 zeroed, and still zero after 2 + 2 steps: the gate's softmax sees the same logit (b2, shared by the
    # four positions) for every position, exact average pooling whatever b2 drifts to by rounding
    assert len(gates) == 4 and all(not v.any() for v in gates.values())
    record = json.loads((run / "result.json").read_text())
    assert record["settings"]["prealign"]["steps"] == 2 and record["set"] == "prealign"
