"""What an encoder does to an image of a given size: input after the policy, grid and tokens per stage,
parameters, FLOPs and (optionally) forward time. Used by ``python -m llava_uhd.vision`` and the benchmarks
(the roofline pieces, FLOPs and time per encoder part, are in ``llava_uhd.bench.roofline``)."""

from __future__ import annotations

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

