"""``python -m llava_uhd.app``: a missing or broken model folder, a wrong option, a typo, a port in use: one message
on stderr and a non-zero exit, never a traceback, and nothing served."""

from __future__ import annotations

import socket

import pytest
import torch

from llava_uhd.app.__main__ import main


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of ``main(argv)`` (argparse's own exits included)."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, status, message", [
    ([], 2, "the following arguments are required: --model"),
    (["--model"], 2, "expected one argument"),
    (["--model", "x", "--modle", "y"], 2, "unrecognized arguments: --modle y"),
    (["--model", ""], 1, "is not a model folder"),
    (["--model", "{model}", "--api", ""], 1, "expected an http(s) URL"),
    (["--model", "x", "--port", "seventy"], 2, "expected an integer, got 'seventy'"),
    (["--model", "x", "--port", "70000"], 2, "expected a number from 1 to 65535"),
    (["--model", "x", "--max-file-mb", "0"], 2, "expected a number of at least 0.001"),
    (["--model", "x", "--resize-policy", "fast"], 2, "invalid choice: 'fast'"),
    (["--model", "no/such/folder"], 1, "error: --model: no model folder at no/such/folder"),
    (["--model", "{empty}"], 1, "is not a model folder"),
    (["--model", "{broken}"], 1, "error: --model: cannot load"),
    (["--model", "{model}", "--api", "ftp://example"], 1, "expected an http(s) URL"),
    (["--model", "{model}", "--device", "warp-drive"], 1, "--device warp-drive: not a device name"),
])
def test_bad_command_lines_are_one_message(capsys, tmp_path, demo_model_dir, argv, status, message):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in demo_model_dir.iterdir():  # the model folder with a damaged weights file
        (broken / file.name).write_bytes(b"not tensors" if file.suffix == ".safetensors" else file.read_bytes())
    argv = [a.format(empty=tmp_path / "empty", broken=broken, model=demo_model_dir) for a in argv]
    code, err = run_main(capsys, *argv)
    assert code == status and message in err and "Traceback" not in err
    if status == 1:
        assert err.count("\n") == 1, err  # one line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_message(capsys, demo_model_dir):
    code, err = run_main(capsys, "--model", str(demo_model_dir), "--device", "cuda")
    assert code == 1 and "no CUDA device is available" in err


def test_port_in_use_is_one_message(capsys, demo_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(capsys, "--model", str(demo_model_dir), "--device", "cpu", "--port", str(port))
    assert code == 1 and f"error: --port {port}: cannot serve there" in err and "Traceback" not in err
