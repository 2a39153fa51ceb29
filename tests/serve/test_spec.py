"""The serving spec and the launcher's checks, without vLLM (fast; main environment)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_uhd.mllm import LlavaUHD
from llava_uhd.serve.spec import SERVE_ARCHITECTURE, NotServableError, load_spec

from .folders import write_serving_export, write_serving_release

SIZES = [(427, 640), (200, 300), (420, 150), (1000, 40), (33, 2900)]


@pytest.mark.parametrize("kind", ["release", "siglip-mlp", "siglip-merger", "moonvit-merger", "gne-merger"])
def test_spec_counts_and_sizes_as_the_model_does(tmp_path, kind):
    if kind == "release":
        folder = write_serving_release(tmp_path / "release", tmp_path / "tok")
    else:
        encoder = {"siglip": "vit_uhd_tiny_patch10_siglip", "moonvit": "vit_uhd_tiny_patch10_moonvit",
                   "gne": "vit_gne_tiny_patch14_siglip"}[kind.split("-")[0]]
        folder = write_serving_export(tmp_path / kind, tmp_path / "tok", encoder=encoder, projector=kind.split("-")[1])
    spec, model = load_spec(folder), LlavaUHD.from_pretrained(folder)
    assert spec.counter == model.image_token_counter() and spec.policy == model.policy
    assert spec.image_token_id == model.image_token_id
    for h, w in SIZES:
        th, tw = spec.target_size(h, w)
        assert spec.num_image_tokens(th, tw) == model.num_image_tokens(th, tw)


def test_save_pretrained_writes_what_vllm_reads_and_still_loads(tmp_path):
    folder = write_serving_export(tmp_path / "m", tmp_path / "tok")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [SERVE_ARCHITECTURE] and config["model_type"] == "llava_uhd"
    LlavaUHD.from_pretrained(folder)


def test_unservable_folders_are_clear_errors(tmp_path):
    with pytest.raises(NotServableError, match="no model folder"):
        load_spec(tmp_path / "missing")
    with pytest.raises(NotServableError, match="no config.json"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NotServableError):
        load_spec(tmp_path)


def run_launcher(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_uhd.serve", *args], capture_output=True, text=True,
                          timeout=120)


def test_launcher_without_vllm_says_how_to_get_it(tmp_path):
    out = run_launcher(str(tmp_path))
    assert out.returncode == 2 and "make serve-env" in out.stderr and "Traceback" not in out.stderr
