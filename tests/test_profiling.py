"""``llava_uhd.profiling``: the clocks, the peak-memory probe and the device set-up the benchmarks share."""

import time

import pytest
import torch

from llava_uhd.errors import SettingsError
from llava_uhd.profiling import PeakMemory, count_flops, elapsed_ms, machine_name, mark, median_ms, pick_device


def test_cpu_marks_measure_the_time_between_them():
    start = mark("cpu")
    time.sleep(0.02)
    stop = mark("cpu")
    assert isinstance(start, float) and 15 <= elapsed_ms(start, stop) < 1000
    assert median_ms(lambda: time.sleep(0.005), repeats=3, warmup=0) >= 4


def test_peak_memory_sees_a_block_that_allocated_and_freed_64_mib():
    device = torch.device("cpu")
    if "clear_refs" not in PeakMemory.method(device):
        pytest.skip("no resettable RSS high-water mark here (ru_maxrss only sees the process-lifetime peak)")
    with PeakMemory(device) as probe:
        x = torch.ones(16 * 2**20)  # 64 MiB of float32, touched
        del x
    assert 56 <= probe.mb < 200
    with PeakMemory(device) as idle:
        pass
    assert idle.mb < 16  # the earlier block's peak was reset, not carried over


def test_pick_device_defaults_and_errors():
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16")[1] == torch.bfloat16
    assert pick_device("auto")[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SettingsError, match="--device cpuu: not a device name"):
        pick_device("cpuu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="--device cuda: no CUDA device"):
            pick_device("cuda")
    assert "torch threads" in machine_name("cpu")


def test_count_flops_counts_a_matmul_on_the_meta_device():
    a, b = torch.empty(8, 16, device="meta"), torch.empty(16, 4, device="meta")
    assert count_flops(torch.mm, a, b) == 2 * 8 * 16 * 4
