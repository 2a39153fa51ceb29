"""The packing and roofline benchmarks (``bench pack`` / ``bench roofline``) on the tiny encoder: what they
measure is what they say, and bad input ends in one message."""

from __future__ import annotations

import csv
import json
import time

import pytest
import timm
import torch

from llava_uhd.bench import pack
from llava_uhd.bench.__main__ import main
from llava_uhd.bench.roofline import TIMED_PARTS, PartTimer, gemm_rate, part_flops, timed_part_of

TINY = "vit_uhd_tiny_patch10_siglip"
SIZES = [(40, 80), (80, 40), (80, 80)]


def test_timed_part_of_names_the_four_parts_and_nothing_else():
    assert timed_part_of("patch_embed.proj") == "patch_embed"
    assert timed_part_of("blocks.3.attn") == "attention"
    assert timed_part_of("blocks.3.mlp") == "mlp"
    assert timed_part_of("wtc.2") == "wtc"
    for other in ("blocks.3", "blocks.3.attn.qkv", "blocks.3.norm1", "norm", "wtc.2.gate", "patch_embed"):
        assert timed_part_of(other) is None


def test_part_flops_add_up_and_packing_adds_no_flops():
    dense = part_flops(TINY, SIZES, dense=True)
    packed = part_flops(TINY, SIZES, dense=False)
    assert dense == packed  # per-image attention: a pack costs exactly the sum of its images
    assert all(dense[p] > 0 for p in TIMED_PARTS)
    assert dense["other"] >= 0 and sum(dense[p] for p in TIMED_PARTS) + dense["other"] == dense["total"]
    bigger = part_flops(TINY, [(80, 160)])
    assert bigger["attention"] > 2 * part_flops(TINY, [(40, 80)])["attention"]  # quadratic in tokens


def test_block_diagonal_flops_grow_with_the_square_of_the_pack():
    """k equal images of n tokens: per-image attention is k * (projections + core), the pack-wide mask's is
    k * projections + k^2 * core, so the extra work is (k^2 - k) * core: 0, 2, 6 times core for k = 1, 2, 3."""
    def extra(k):
        packed = part_flops(TINY, [(80, 80)] * k, dense=False)
        masked = part_flops(TINY, [(80, 80)] * k, dense=False, attn_impl="block_diagonal")
        others = [p for p in TIMED_PARTS if p != "attention"]
        assert {p: masked[p] for p in others} == {p: packed[p] for p in others}
        return masked["attention"] - packed["attention"]

    assert extra(1) == 0 and extra(2) > 0
    assert extra(3) == 3 * extra(2)


def test_part_timer_times_each_part_inside_the_forward():
    model = timm.create_model(TINY).eval()
    timer = PartTimer(model)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(torch.randn(1, 3, 80, 80))
        total_ms = (time.perf_counter() - t0) * 1e3
    ms = timer.collect()
    assert set(ms) == set(TIMED_PARTS) and all(v > 0 for v in ms.values())
    assert sum(ms.values()) <= total_ms
    timer.remove()
    model(torch.randn(1, 3, 80, 80))
    assert timer.collect() == ms  # hooks gone: nothing more is added


def test_gemm_rate_is_a_plausible_flop_rate():
    rate = gemm_rate("cpu", torch.float32, n=256, repeats=2)
    assert 1e8 < rate < 1e14


def test_pack_run_times_three_modes_and_matches_one_by_one(tmp_path):
    result = pack.measure(TINY, SIZES, repeats=2, warmup=0, device="cpu")
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["one_by_one", "packed", "block_diagonal"]
    assert all(len(r["times_ms"]) == 2 and r["median_ms"] > 0 for r in result["rows"])
    assert result["patch_tokens"] == 32 + 32 + 64 and result["output_tokens"] == 2 + 2 + 4
    assert result["packed_kernel"] == "sdpa"
    assert result["packed_vs_one_by_one_max_abs_diff"] < 1e-4
    by = {r["mode"]: r["median_ms"] for r in result["rows"]}
    assert result["packed_over_one_by_one"] == pytest.approx(by["packed"] / by["one_by_one"])
    gflop = result["gflop"]
    assert gflop["block_diagonal"] > gflop["packed"] > 0  # the mask's cross-image attention is counted
    assert result["block_diagonal_over_packed_flops"] == pytest.approx(gflop["block_diagonal"] / gflop["packed"])
    paths = pack.write(result, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)
    with open(tmp_path / "pack_bench.csv") as f:
        assert [row["mode"] for row in csv.DictReader(f)] == modes


@pytest.mark.slow
def test_encoder_bench_writes_the_roofline_beside_its_plot(tmp_path, capsys):
    assert main(["roofline", "--shape", "tiny", "--resolution", "80", "--repeats", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "vision_bench.json").read_text())
    rows = {(r["model"], r["part"]): r for r in result["roofline"]}
    whole = rows[(TINY, "encoder")]
    assert whole["ms"] == result["rows"][0]["median_ms"] and whole["gflop"] > 0
    assert whole["share_of_gemm"] == pytest.approx(whole["gflops_per_s"] * 1e9 / (result["gemm_gflops_per_s"] * 1e9))
    assert all(rows[(TINY, p)]["ms"] > 0 for p in TIMED_PARTS)
    shares = sum(rows[(TINY, p)]["time_share"] for p in (*TIMED_PARTS, "other"))
    assert shares >= 1.0 - 1e-6  # parts + other cover the whole forward (other is clamped at 0)
    assert (tmp_path / "roofline.csv").is_file() and (tmp_path / "roofline.png").stat().st_size > 0
    assert json.loads((tmp_path / "vision_bench.json").read_text())["command"].endswith(str(tmp_path))
    assert "of the GEMM rate" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pack", "--sizes", "40x"], "is not HEIGHTxWIDTH"),
        (["pack", "--sizes", "0x40"], "must be positive"),
        (["pack", "--model", "vit_uhd_tiny_patch10_sigllip"], "unknown encoder"),
        (["pack", "--model", TINY, "--sizes", "50x50"], "must be a positive multiple of 40"),
        (["pack", "--model", TINY, "--device", "cuda:0"], "no CUDA device"),
        (["roofline", "--repeats", "0"], "--repeats and --threads must be >= 1"),
        (["roofline", "--resolution", "big"], "invalid int value"),
        (["pack", "--repeat", "3"], "unrecognized arguments: --repeat 3"),  # no abbreviation of --repeats
    ],
)
def test_bad_input_is_one_clear_message(args, message, capsys, tmp_path):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_out_path_that_is_a_file_stops_before_any_timing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pack, "measure", lambda *a, **k: pytest.fail("timed before checking --out"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["pack", "--model", TINY, "--out", str(tmp_path / "file")])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err
