"""A tiny random-weight model and two small benchmark TSVs with drawn images, to try ``eval run`` and time it
on a CPU without any download (``python -m llava_uhd.eval tiny --out DIR``). The scores mean nothing: the
model is untrained; the files exercise every path (base64 and shared-image rows, hints, answer lists)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "orange", "purple", "teal")


def drawn_image(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A chart-like picture: coloured background, bars, a disc and a label, different for each seed."""
    image = Image.new("RGB", size, COLOURS[seed % len(COLOURS)])
    draw = ImageDraw.Draw(image)
    for k in range(1 + seed % 3):
        x = 8 + 28 * k
        draw.rectangle([x, 10, x + 18, 10 + 8 * (k + 1)], fill="white", outline="black")
    draw.ellipse([60, 30, 84, 54], fill=COLOURS[(seed + 2) % len(COLOURS)])
    draw.text((4, 46), f"S{seed}", fill="black")
    return image


def b64_image(seed: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    drawn_image(seed).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: str | Path, rows: list[dict]) -> Path:
    """Rows as VLMEvalKit writes them: tab-separated, a header of every key, an empty cell for a missing value."""
    path = Path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def vqa_rows(n: int) -> list[dict]:
    """Short-answer rows (10 human answers each); every third row shares row 0's image."""
    return [{"index": i, "image": "0" if i and i % 3 == 0 else b64_image(i), "question": f"What is {i}?",
             "answer": json.dumps([f"word{i}"] * 10), "category": "even" if i % 2 == 0 else "odd"} for i in range(n)]


def mcq_rows(n: int) -> list[dict]:
    """Multiple-choice rows with three options; every fourth row has its own image, the others share it."""
    return [{"index": i, "image": b64_image(i) if i % 4 == 0 else str(i - i % 4), "question": f"Which one is {i}?",
             "hint": "Look closely." if i % 2 else "", "A": "cat", "B": "dog", "C": "bird", "answer": "ABC"[i % 3]}
            for i in range(n)]


def write_tiny(out: str | Path, rows: int = 64, seed: int = 0) -> dict[str, Path]:
    """``out/model`` (tiny ViT-UHD + 2-layer Qwen2, random weights), ``out/TextVQA_VAL.tsv``, ``out/MMStar.tsv``."""
    from llava_uhd.llm import tiny_qwen2_config
    from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
    from llava_uhd.tokenizer import build_tiny_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    config = LlavaUHDConfig(encoder="vit_uhd_tiny_patch10_siglip", projector="mlp",
                            llm=tiny_qwen2_config(1024, hidden_size=64, layers=2, initializer_range=0.2),
                            tokenizer=str(out / "tokenizer"), min_pixels=40 * 40, max_pixels=160 * 160)
    model_dir = LlavaUHD(config).eval().save_pretrained(out / "model")
    return {"model": model_dir, "TextVQA_VAL": write_tsv(out / "TextVQA_VAL.tsv", vqa_rows(rows)),
            "MMStar": write_tsv(out / "MMStar.tsv", mcq_rows(rows))}
