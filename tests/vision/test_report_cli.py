"""``python -m llava_uhd.vision``: a device it cannot use and a round count it cannot time are one message (exit 2)
before any model is built, never a traceback."""

import pytest
import torch

from llava_uhd.vision.__main__ import main

TINY = ["--model", "vit_uhd_tiny_patch10_siglip", "--resolution", "80"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cpuu", "--time"], "--device cpuu: not a device name"),
        (["--device", "cuda:0", "--time"], "--device cuda:0: no CUDA device is available here"),
        (["--time", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    ],
)
def test_bad_device_or_repeats_is_one_message(args, message, capsys):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_:
        main([*TINY, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
