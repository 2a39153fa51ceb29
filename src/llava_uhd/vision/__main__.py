"""``python -m llava_uhd.vision --model NAME --resolution 1024 [--device meta] [--time]``: encoder report as JSON."""

from __future__ import annotations

import argparse
import json

import timm

from ..profiling import pick_device
from . import vit_uhd  # noqa: F401  (registers the models)
from .report import encoder_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m llava_uhd.vision", description=__doc__)
    parser.add_argument("--model", default="vit_uhd_so400m_patch10_siglip", help="timm name (vit_uhd_* or vit_gne_*)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024], help="side, or height width")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or meta (meta: no memory, no --time)")
    parser.add_argument("--time", action="store_true", help="also time the forward pass (median of --repeats)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pooling", default=None, help="override wtc_pooling")
    parser.add_argument("--wtc-layers", type=int, nargs="*", default=None, help="override WTC block indices (1-based)")
    parser.add_argument("--patch-size", type=int, default=None, help="override the RPE patch size")
    parser.add_argument("--pretrained-path", default=None, help="local base ViT weights to load")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    try:
        pick_device(args.device)  # a typo or a CUDA request without a GPU: one message, not a traceback
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if args.model not in timm.list_models("vit_uhd_*") + timm.list_models("vit_gne_*"):
        parser.error(
            f"unknown model {args.model!r}; choose from {timm.list_models('vit_uhd_*') + timm.list_models('vit_gne_*')}"
        )
    overrides = {
        k: v
        for k, v in {
            "wtc_pooling": args.pooling,
            "patch_size": args.patch_size,
            "pretrained_path": args.pretrained_path,
        }.items()
        if v is not None
    }
    if args.wtc_layers is not None:
        overrides["wtc_layers"] = tuple(args.wtc_layers)
    resolution = args.resolution[0] if len(args.resolution) == 1 else tuple(args.resolution[:2])
    try:
        report = encoder_report(args.model, resolution, args.device, args.time, args.repeats, **overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
