"""``make demo``: encode a generated photo-like image with tiny ViT-UHD and the GNE baseline, print reports."""

from __future__ import annotations

import json

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw

from .vision import preprocess
from .vision.report import encoder_report, policy_for


def generated_image(width: int = 900, height: int = 600, seed: int = 0) -> Image.Image:
    """A colourful scene of shapes on a gradient, drawn with PIL."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(40, 200, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
    image = Image.fromarray(gradient)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, width - 80), rng.integers(0, height - 80)
        size = int(rng.integers(30, 120))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = rng.choice(["ellipse", "rectangle"])
        getattr(draw, shape)([x, y, x + size, y + size], fill=colour)
    return image


def main() -> None:
    torch.manual_seed(0)
    image = generated_image()
    print(f"generated image: {image.width}x{image.height}")
    for name in ("vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_siglip"):
        model = timm.create_model(name).eval()
        pixels = preprocess(image, policy_for(model))
        with torch.no_grad():
            out = model(pixels[None])
        report = encoder_report(name, (image.height, image.width), time_it=True, repeats=3)
        assert report["output_tokens"] == out.tokens.shape[1]
        summary = {k: report[k] for k in ("model", "input_size", "output_tokens", "tflops", "forward_ms_median")}
        summary["tokens_per_stage"] = [s["tokens"] for s in report["stages"]]
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
