"""Benchmark TSV files written by the tests: drawn images (shapes and text, PIL), base64 and shared-image rows."""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


def drawn_image(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A chart-like picture: a coloured background, a few shapes and a word, different for each seed."""
    colours = ["red", "green", "blue", "orange", "purple", "teal"]
    image = Image.new("RGB", size, colours[seed % len(colours)])
    draw = ImageDraw.Draw(image)
    for k in range(1 + seed % 3):
        x = 8 + 28 * k
        draw.rectangle([x, 10, x + 18, 10 + 8 * (k + 1)], fill="white", outline="black")
    draw.ellipse([60, 30, 84, 54], fill=colours[(seed + 2) % len(colours)])
    draw.text((4, 46), f"S{seed}", fill="black")
    return image


def b64_image(seed: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    drawn_image(seed).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """Rows as VLMEvalKit writes them (tab-separated, header of the union of keys, empty cell = missing)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_predictions(path: Path, predictions: dict) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for index, text in predictions.items():
            handle.write(json.dumps({"index": index, "prediction": text}, ensure_ascii=False) + "\n")
    return path


def vqa_rows(n: int, answer_list: bool = True) -> list[dict]:
    """Short-answer rows; every third row shares row 0's image (``image`` = "0")."""
    rows = []
    for i in range(n):
        answer = json.dumps([f"word{i}"] * 10) if answer_list else f"word{i}"
        rows.append({"index": i, "image": "0" if i and i % 3 == 0 else b64_image(i), "question": f"What is {i}?",
                     "answer": answer, "category": "even" if i % 2 == 0 else "odd"})
    return rows


@pytest.fixture
def tsv_dir(tmp_path):
    return tmp_path
