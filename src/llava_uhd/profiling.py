"""FLOP counting, timing, peak memory and device set-up: the one place the CLIs and benchmarks measure from.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``. On CPU tensors the fused attention kernel
is not counted, so counts are taken on the meta device, where SDPA decomposes into matmuls and no memory
is allocated: the full SO400M shape can be counted on a laptop.

Time: CUDA work is timed with CUDA events (``mark`` / ``elapsed_ms``: no synchronisation between phases),
CPU work with ``time.perf_counter``. Peak memory (``PeakMemory``): ``torch.cuda.max_memory_allocated`` on
CUDA; on CPU the process's RSS high-water mark, reset per block through ``/proc`` (neither torch nor the
standard library can reset a CPU peak: ``resource.getrusage`` only sees the process-lifetime maximum, so it
is the fallback where ``/proc`` is missing).
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_uhd.errors import SettingsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` names of the benchmarks."""


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs (multiply-add = 2) of ``fn(*args, **kwargs)``, run under no_grad."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so that timings are real."""
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device | str | None = None) -> float:
    """Milliseconds of one call of ``fn``, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def median_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn, device) for _ in range(repeats))


def mark(device: torch.device | str) -> float | torch.cuda.Event:
    """A point in time on ``device``: a recorded CUDA event (read later, no synchronisation now) or the CPU clock."""
    if torch.device(device).type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start: float | torch.cuda.Event, stop: float | torch.cuda.Event) -> float:
    """Milliseconds between two ``mark``s (CUDA: the caller has synchronised on ``stop`` first)."""
    if isinstance(start, float):
        return (stop - start) * 1e3
    return start.elapsed_time(stop)


def pick_device(device: str, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a ``--device`` / ``--dtype`` option asks for, checked before any work: ``auto`` is
    CUDA when available, else CPU; the dtype defaults to fp32 on CPU, bf16 on CUDA. A name torch does not
    know and a CUDA request without a GPU are a :class:`SettingsError` naming the option."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingsError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {device}: no CUDA device is available here")
    return dev, DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]


def machine_name(device: torch.device | str = "cpu") -> str:
    """What ran the benchmark: the GPU's name, or the CPU model and the torch thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def _status_kib(key: str) -> int:
    """One ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Extra memory a block of work needs at its peak, in MiB (weights already resident are excluded).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
    before. CPU (Linux): the process RSS high-water mark (``VmHWM``) after resetting it through
    ``/proc/self/clear_refs``, minus the RSS before (freed heap first returned with ``malloc_trim``); where
    that is unavailable, the ``ru_maxrss`` delta, which only sees growth beyond the process's earlier peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0

    @staticmethod
    def method(device: torch.device) -> str:
        """How the peak is measured on ``device`` (resets the CPU high-water mark as a probe)."""
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated delta"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) minus RSS before, after malloc_trim"
        except OSError:
            return "resource.getrusage ru_maxrss delta (process-lifetime peak: lower bound)"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.proc = "clear_refs" in self.method(self.device)
        self.base = _status_kib("VmRSS") if self.proc else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.proc:
            self.mb = (_status_kib("VmHWM") - self.base) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) * scale / 2**20
