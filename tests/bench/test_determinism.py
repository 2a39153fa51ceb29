"""The pilot is deterministic, and its numbers are pinned by a golden loss curve.

Two runs of the same tiny pilot (PVC arm, seed 0, one thread, 50 steps), each with its own freshly generated
data, tokenizer and run folder, must give bit-identical data and tokenizer hashes, loss curves, exported
weights and held-out answers. The first run's loss curve must equal ``golden/pilot_loss.json``.

A change to the golden numbers means the code now trains differently (data generator, tokenizer, model,
initialisation, optimiser, data order, ...): the committed pilot and ablation results (``docs/pilot``,
``docs/ablations``) no longer come from the code that is shipped. Re-run them, and update the golden in the
same change:

    LLAVA_UHD_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/bench/test_determinism.py -p no:cacheprovider

The golden names the platform it was made on. Runs pin their CPU kernels (``llava_uhd.bench.runs.KERNELS``), so
on any platform with the same kernel set and library versions (``PLATFORM_KEYS``; the CPU model does not count)
the comparison is exact. Elsewhere (another torch, a CPU without AVX2) float roundings differ by a few units in the
last place, so the curve is compared to a relative 1e-4 there (a change of the code moves it by far more).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.runs import PLATFORM_KEYS, platform_info

GOLDEN = Path(__file__).parent / "golden" / "pilot_loss.json"
UPDATE = "LLAVA_UHD_UPDATE_GOLDEN"
STEPS = 50
REGENERATE = (f"re-run the committed pilot and ablation results (docs/pilot, docs/ablations) with this code and "
              f"update the golden with them: {UPDATE}=1 .venv/bin/python -m pytest -q "
              "tests/bench/test_determinism.py -p no:cacheprovider")


def pilot_args(folder: Path) -> list[str]:
    return [
        "pilot", "--task", "where", "--encoders", "pvc", "--seeds", "0", "0", "--steps", str(STEPS),
        "--threads", "1", "--jobs", "1", "--grid", "2", "--min-side", "64", "--max-side", "64",
        "--train-samples", "16", "--test-samples", "4", "--out", str(folder / "out"), "--runs", str(folder / "runs"),
        "--data", str(folder / "data"), "--tokenizer", str(folder / "tokenizer"),
        "--fit-arg=--trainer.log_every_n_steps=1", "--fit-arg=--trainer.enable_model_summary=false",
        "--fit-arg=--trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, list]]:
    """(record, answers) of two runs of the same tiny pilot, each in its own folders."""
    out = []
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp(name)
        assert main(pilot_args(folder)) == 0
        run_dir = folder / "runs" / "where" / "pvc" / "seed0"
        out.append((json.loads((run_dir / "result.json").read_text()),
                    json.loads((run_dir / "answers.json").read_text())))
    return out


@pytest.mark.slow
def test_the_same_pilot_run_twice_is_bit_identical(two_runs):
    (first, first_answers), (second, second_answers) = two_runs
    assert first["complete"] and first["trained_steps"] == STEPS and len(first["loss_curve"]) == STEPS
    for key in ("data_hash", "data_hashes", "tokenizer_hash", "config_hash", "platform_hash"):
        assert first[key] == second[key], key
    assert first["loss_curve"] == second["loss_curve"]  # every logged loss, bit for bit
    assert first["export_sha"] == second["export_sha"]  # the trained weights, byte for byte
    assert first_answers == second_answers and first["answers_sha"] == second["answers_sha"]
    assert first["accuracy"] == second["accuracy"] and first["learned_at_step"] == second["learned_at_step"]


@pytest.mark.slow
def test_the_pilot_loss_curve_matches_the_golden(two_runs):
    record, _ = two_runs[0]
    here = platform_info()
    if os.environ.get(UPDATE):
        GOLDEN.parent.mkdir(exist_ok=True)
        about = {"about": "first run of tests/bench/test_determinism.py; see its docstring before changing",
                 "command": " ".join(pilot_args(Path("<tmp>"))), "steps": STEPS, "platform": here,
                 "data_hash": record["data_hash"], "tokenizer_hash": record["tokenizer_hash"]}
        curve = ",\n".join(f"  [{step}, {json.dumps(value)}]" for step, value in record["loss_curve"])
        GOLDEN.write_text(json.dumps(about, indent=1)[:-2] + f',\n "loss_curve": [\n{curve}\n ]\n}}\n')
        pytest.skip(f"{UPDATE} set: wrote {GOLDEN.name}")
    golden = json.loads(GOLDEN.read_text())
    made_on = golden["platform"]
    differs = {k: (made_on.get(k), here.get(k)) for k in PLATFORM_KEYS if made_on.get(k) != here.get(k)}
    where = f"on another platform than the golden's ({differs})" if differs else "on the golden's platform"
    steps = [step for step, _ in record["loss_curve"]]
    assert steps == [step for step, _ in golden["loss_curve"]], f"logged steps differ from the golden's; {REGENERATE}"
    if not differs:
        assert record["data_hash"] == golden["data_hash"], (
            f"the generated pilot data differs from the golden's ({record['data_hash']} != {golden['data_hash']}); "
            f"{REGENERATE}")
        assert record["tokenizer_hash"] == golden["tokenizer_hash"], f"the tiny tokenizer differs; {REGENERATE}"
    for (step, value), (_, expected) in zip(record["loss_curve"], golden["loss_curve"]):
        same = value == expected if not differs else math.isclose(value, expected, rel_tol=1e-4)
        assert same, (f"loss at step {step} is {value!r}, the golden says {expected!r} ({where}): the pilot trains "
                      f"differently than when its results were made; {REGENERATE}")
