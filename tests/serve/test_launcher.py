"""``python -m llava_uhd.serve`` in the serving environment: bad input is one clear message and exit 2."""

from __future__ import annotations

import subprocess

import pytest

from llava_uhd.serve.client import SERVE_PYTHON

from .folders import write_serving_export


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher")
    return write_serving_export(root / "m", root / "tok")


@pytest.mark.skipif(not SERVE_PYTHON.is_file(), reason="no serving environment (.venv-serve): run `make serve-env`")
@pytest.mark.parametrize("case", ["missing", "file", "empty", "typo", "bad-number"])
def test_bad_launcher_input_is_one_message_and_exit_2(tmp_path, folder, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    args = {"missing": [str(tmp_path / "nope")], "file": [str(tmp_path / "file.txt")],
            "empty": [str(tmp_path / "empty")], "typo": [str(folder), "--max-image-pixel", "5"],
            "bad-number": [str(folder), "--max-image-pixels", "lots"]}[case]
    out = subprocess.run([str(SERVE_PYTHON), "-m", "llava_uhd.serve", *args], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "error" in out.stderr.lower()
