"""What an encoder does to an image of a given size: input after the policy, grid and tokens per stage,
parameters, FLOPs and (optionally) forward time; and the roofline pieces (FLOPs and time per encoder part,
a large GEMM's rate). Used by ``python -m llava_uhd.vision`` and the benchmark."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import timm
import torch

from ..profiling import count_flops, median_ms
from .resize import ResolutionPolicy
from .vit_uhd import ViTUHD


def policy_for(model: ViTUHD, **overrides: Any) -> ResolutionPolicy:
    """The default resolution policy with the multiple this encoder needs."""
    return ResolutionPolicy(**{"multiple": model.reduction, **overrides})


def stage_table(model: ViTUHD, height: int, width: int) -> list[dict[str, Any]]:
    """Token grid and count for each run of blocks between compressions."""
    grids = model.stage_grids(height, width)
    bounds = [0, *model.cfg.wtc_layers, model.cfg.depth]
    rows = []
    for stage, grid in enumerate(grids):
        first, last = bounds[stage] + 1, bounds[stage + 1]
        rows.append(
            {
                "stage": stage,
                "blocks": f"{first}-{last}" if first <= last else "none",
                "grid": list(grid),
                "tokens": grid[0] * grid[1],
            }
        )
    return rows


def encoder_flops(name: str, height: int, width: int, **model_kwargs: Any) -> int:
    """FLOPs of one forward at batch 1, counted on the meta device (no memory, attention as matmuls)."""
    model = timm.create_model(name, device="meta", **model_kwargs).eval()
    return count_flops(model, torch.empty(1, 3, height, width, device="meta"))


def encoder_report(
    name: str,
    resolution: int | tuple[int, int],
    device: str = "cpu",
    time_it: bool = False,
    repeats: int = 5,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """JSON-ready report for encoder ``name`` on a ``resolution`` (side, or (height, width)) image."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    model = timm.create_model(name, device="meta" if device == "meta" else None, **model_kwargs)
    policy = policy_for(model)
    in_h, in_w = policy.target_size(height, width)
    out_grid = model.output_grid(in_h, in_w)
    report: dict[str, Any] = {
        "model": name,
        "requested_size": [height, width],
        "input_size": [in_h, in_w],
        "policy": {
            "min_pixels": policy.min_pixels,
            "max_pixels": policy.max_pixels,
            "max_side": policy.max_side,
            "multiple": policy.multiple,
        },
        "patch_size": model.patch_size,
        "wtc_layers": list(model.cfg.wtc_layers),
        "wtc_pooling": model.cfg.wtc_pooling if model.cfg.wtc_layers else None,
        "stages": stage_table(model, in_h, in_w),
        "output_grid": list(out_grid),
        "output_tokens": out_grid[0] * out_grid[1],
        "pixels_per_token": model.reduction,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops": encoder_flops(name, in_h, in_w, **model_kwargs),
    }
    report["tflops"] = round(report["flops"] / 1e12, 4)
    if time_it:
        if device == "meta":
            raise ValueError("--time needs a real device (cpu or cuda), not meta")
        model = model.to(device).eval()
        x = torch.randn(1, 3, in_h, in_w, device=device)
        with torch.inference_mode():
            report["forward_ms_median"] = round(median_ms(lambda: model(x), repeats=repeats, device=device), 2)
        report["device"] = str(device)
    return report


# -- roofline: FLOPs and time per part against a large GEMM's rate ------------------------------------------------
PARTS = ("patch_embed", "attention", "mlp", "wtc")
"""Encoder parts timed and counted separately; everything else (norms, residual adds, pos-embed, token reorder)
is reported as ``other``."""


def part_of(module_name: str) -> str | None:
    """The part a (dotted) module name belongs to, or None for a container or a leaf outside every part."""
    parts = module_name.split(".")
    if parts[:2] == ["patch_embed", "proj"] and len(parts) == 2:
        return "patch_embed"
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("attn", "mlp"):
        return "attention" if parts[2] == "attn" else "mlp"
    if len(parts) == 2 and parts[0] == "wtc":
        return "wtc"
    return None


def part_flops(name: str, sizes: list[tuple[int, int]], dense: bool = True, **model_kwargs: Any) -> dict[str, int]:
    """FLOPs per part (and ``total``) of one forward of images ``sizes``, counted on the meta device.

    ``dense``: one [1, 3, H, W] forward per image (summed); otherwise one packed forward of the list."""
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(name, device="meta", **model_kwargs).eval()
    model.attn_impl = "sdpa"  # on the meta device SDPA decomposes into counted matmuls
    inputs = [torch.empty(1, 3, h, w, device="meta") for h, w in sizes] if dense else [
        [torch.empty(3, h, w, device="meta") for h, w in sizes]]
    out = dict.fromkeys((*PARTS, "total"), 0)
    for x in inputs:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        prefix = type(model).__name__ + "."
        for module, ops in counter.get_flop_counts().items():
            part = part_of(module.removeprefix(prefix)) if module.startswith(prefix) else None
            if part is not None:
                out[part] += sum(ops.values())
        out["total"] += int(counter.get_total_flops())
    out["other"] = out["total"] - sum(out[p] for p in PARTS)
    return out


class PartTimer:
    """Forward hooks that add up the wall time spent in each part (``PARTS``) while enabled.

    CUDA: a pair of events per call, read once at the end (no synchronisation inside the forward); CPU: the
    clock between the pre-hook and the hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ms = dict.fromkeys(PARTS, 0.0)
        self._pending: list[tuple[str, Any, Any]] = []
        self._handles = []
        self._open: dict[int, Any] = {}
        for module_name, module in model.named_modules():
            part = part_of(module_name)
            if part is not None:
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(partial(self._stop, part)))

    def _now(self, module: torch.nn.Module) -> Any:
        param = next(module.parameters(), None)
        if param is not None and param.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._open[id(module)] = self._now(module)

    def _stop(self, part: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._pending.append((part, self._open.pop(id(module)), self._now(module)))

    def collect(self) -> dict[str, float]:
        """Add the pending intervals to ``ms`` (synchronising CUDA once) and return ``ms``."""
        if any(not isinstance(start, float) for _, start, _ in self._pending):
            torch.cuda.synchronize()
        for part, start, stop in self._pending:
            self.ms[part] += start.elapsed_time(stop) if not isinstance(start, float) else (stop - start) * 1e3
        self._pending.clear()
        return self.ms

    def take(self) -> dict[str, float]:
        """The ms per part since the last ``take`` (collected), and start again from zero."""
        ms = dict(self.collect())
        self.ms = dict.fromkeys(PARTS, 0.0)
        return ms

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def gemm_rate(device: str | torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of an ``n x n x n`` matmul (median of ``repeats`` after one warm-up): the machine's practical
    limit the encoder is held against. Default ``n``: 2048 on CPU, 8192 on CUDA."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), repeats=repeats, warmup=1, device=device)
    return 2 * n**3 / (ms / 1e3)
