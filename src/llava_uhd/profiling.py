"""FLOP counting and wall-clock timing shared by the CLIs and benchmarks.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``. On CPU tensors the fused attention kernel
is not counted, so counts are taken on the meta device, where SDPA decomposes into matmuls and no memory
is allocated: the full SO400M shape can be counted on a laptop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


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
