"""``python -m llava_uhd.vision`` report and the FLOP counting behind it."""

import json
import subprocess
import sys

import pytest
import timm
import torch

from llava_uhd.vision.__main__ import main
from llava_uhd.vision.report import encoder_flops


def test_report_matches_what_the_encoder_emits(capsys):
    report = main(["--model", "vit_uhd_tiny_patch10_siglip", "--resolution", "300", "500", "--time", "--repeats", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == report
    h, w = report["input_size"]
    assert h % 40 == 0 and w % 40 == 0
    model = timm.create_model("vit_uhd_tiny_patch10_siglip").eval()
    with torch.no_grad():
        tokens = model(torch.randn(1, 3, h, w)).tokens
    assert report["output_tokens"] == tokens.shape[1]
    assert [s["tokens"] for s in report["stages"]] == [(h // 10) * (w // 10), (h // 20) * (w // 20), tokens.shape[1]]
    assert [s["blocks"] for s in report["stages"]] == ["1-2", "3-4", "5-6"]
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["forward_ms_median"] > 0 and report["flops"] > 0


def test_flops_of_the_full_size_gne_encoder_reproduce_the_paper_setting():
    # The paper: SO400M/14 without compression at 1022^2 (73x73 tokens) = 7.92 TFLOP, counted on meta
    # (docs/model.md, "Token counts").
    assert encoder_flops("vit_gne_so400m_patch14_siglip", 1022, 1022) / 1e12 == pytest.approx(7.92, abs=0.01)
    uhd = encoder_flops("vit_uhd_so400m_patch10_siglip", 1040, 1040) / 1e12
    assert 4.5 < uhd < 6.0  # 5.42 in docs/model.md, "Token counts"


def test_overrides_and_errors_go_through_the_cli():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_uhd.vision",
            "--model",
            "vit_uhd_tiny_patch10_siglip",
            "--pooling",
            "avg",
            "--wtc-layers",
            "3",
            "--device",
            "meta",
            "--resolution",
            "256",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(ok.stdout)
    assert report["wtc_layers"] == [3] and report["wtc_pooling"] == "avg" and report["pixels_per_token"] == 20
    bad = subprocess.run(
        [sys.executable, "-m", "llava_uhd.vision", "--model", "vit_uhd_tiny_patch10_siglip", "--wtc-layers", "2", "9"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "wtc_layers" in bad.stderr
