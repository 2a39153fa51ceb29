"""Synthetic benchmark data with exact answers: ShapeGrid, TextGrid and Caption.

The pilot experiment's benchmark (after the paper's ShapeGrid): images of every size from ``min_side`` to
``max_side`` pixels per side and aspect ratios from 1:4 to 4:1, each with one question whose answer is
checked by exact match. ``meta`` records the task, question, answer and the grid position(s) involved.

* ``shapegrid``: a grid of coloured shapes (some cells empty). "What is at row r, column c?" -> "red
  circle", or "How many red circles are there?" -> "3".
* ``textgrid``: a grid of words (OCR). "What word is at row r, column c?" -> "apple".
* ``caption``: a few shapes in a row. "Describe the scene." -> "a red circle, a blue square and a green
  star on a white background." (objects listed left to right).

Deterministic: sample ``i`` depends only on ``(seed, i)``.

    python -m datamodules.synthetic --task shapegrid --n 1000 --out data/shapegrid --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datamodules.shards import ShardSetWriter

TASKS = ("shapegrid", "textgrid", "caption")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20), "cyan": (20, 190, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
WORDS = (
    "apple river stone cloud green tiger paper music light house table water north seven bread "
    "glass horse smile train ocean piano chair dream plant field storm quiet maple lemon zebra "
    "candle rocket bridge silver winter garden forest yellow window spring orange butter"
).split()
BACKGROUNDS = {"white": (255, 255, 255), "grey": (200, 200, 200), "beige": (240, 230, 200)}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    """(height, width) with both sides in [min_side, max_side] and aspect ratio within 1:4..4:1."""
    ratio = math.exp(rng.uniform(math.log(1 / 4), math.log(4)))  # height / width
    ratio = min(max(ratio, min_side / max_side), max_side / min_side)
    lo, hi = max(min_side, min_side * ratio), min(max_side, max_side * ratio)
    height = int(rng.uniform(lo, hi))
    width = int(min(max(round(height / ratio), min_side), max_side))
    return height, width


def _grid(rng: np.random.Generator, height: int, width: int, cell_min: int = 48) -> tuple[int, int]:
    rows = int(rng.integers(2, max(3, min(8, height // cell_min) + 1)))
    cols = max(2, min(8, width // cell_min, round(rows * width / height)))
    return rows, cols


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "star":
        points = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(points, fill=colour)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)


def _cells(height: int, width: int, rows: int, cols: int, r: int, c: int, pad: float = 0.15):
    ch, cw = height / rows, width / cols
    return (c * cw + pad * cw, r * ch + pad * ch, (c + 1) * cw - pad * cw, (r + 1) * ch - pad * ch)


def shapegrid(rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, str, str, dict]:
    rows, cols = _grid(rng, height, width)
    image = Image.new("RGB", (width, height), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(image)
    names = list(COLOURS)
    grid = {}
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.75:
                grid[(r, c)] = (names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))])
                _draw_shape(draw, grid[(r, c)][1], _cells(height, width, rows, cols, r, c), COLOURS[grid[(r, c)][0]])
    if not grid:
        grid[(0, 0)] = ("red", "circle")
        _draw_shape(draw, "circle", _cells(height, width, rows, cols, 0, 0), COLOURS["red"])
    meta = {"rows": rows, "cols": cols}
    if rng.random() < 0.6:
        (r, c), (colour, shape) = sorted(grid.items())[rng.integers(len(grid))]
        question = (f"The image shows a grid with {rows} rows and {cols} columns. What is the shape at row {r + 1}, "
                    f"column {c + 1}? Answer with the colour and the shape.")
        answer = f"{colour} {shape}"
        meta.update(kind="position", row=r + 1, col=c + 1)
    else:
        colour, shape = sorted(grid.values())[rng.integers(len(grid))]
        cells = sorted([r + 1, c + 1] for (r, c), v in grid.items() if v == (colour, shape))
        question = f"How many {colour} {_plural(shape)} are there in the image? Answer with a number."
        answer = str(len(cells))
        meta.update(kind="count", positions=cells)
    return image, question, answer, meta


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed small bitmap font
        return ImageFont.load_default()


def textgrid(rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, str, str, dict]:
    rows, cols = _grid(rng, height, width, cell_min=64)
    cols = max(1, min(cols, width // 72))
    image = Image.new("RGB", (width, height), BACKGROUNDS["beige"])
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = width / cols, height / rows
    font = _font(max(8, int(min(cell_h * 0.45, cell_w / 5))))
    words = {}
    for r in range(rows):
        for c in range(cols):
            word = WORDS[rng.integers(len(WORDS))]
            words[(r, c)] = word
            draw.text(((c + 0.5) * cell_w, (r + 0.5) * cell_h), word, fill=(15, 15, 15), font=font, anchor="mm")
    for r in range(1, rows):
        draw.line([(0, r * cell_h), (width, r * cell_h)], fill=(150, 150, 150), width=1)
    for c in range(1, cols):
        draw.line([(c * cell_w, 0), (c * cell_w, height)], fill=(150, 150, 150), width=1)
    r, c = int(rng.integers(rows)), int(rng.integers(cols))
    question = (f"The image shows a grid of words with {rows} rows and {cols} columns. What word is written at "
                f"row {r + 1}, column {c + 1}? Answer with the word.")
    return image, question, words[(r, c)], {"rows": rows, "cols": cols, "kind": "ocr", "row": r + 1, "col": c + 1}


def caption(rng: np.random.Generator, height: int, width: int) -> tuple[Image.Image, str, str, dict]:
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    image = Image.new("RGB", (width, height), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    n = int(rng.integers(1, 5))
    names = [n for n in COLOURS if n != "black" or background != "white"]
    objects = []
    slot = width / n
    for i in range(n):
        colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        size = min(slot, height) * rng.uniform(0.4, 0.8)
        cx, cy = (i + 0.5) * slot, rng.uniform(size / 2, height - size / 2)
        _draw_shape(draw, shape, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), COLOURS[colour])
        objects.append({"colour": colour, "shape": shape, "col": i + 1})
    phrases = [f"a {o['colour']} {o['shape']}" for o in objects]
    listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    answer = f"{listed} on a {background} background."
    return image, "Describe the scene.", answer, {"kind": "caption", "objects": objects, "background": background}


GENERATORS = {"shapegrid": shapegrid, "textgrid": textgrid, "caption": caption}


def make_sample(task: str, index: int, seed: int, min_side: int = 256, max_side: int = 1536):
    """(PIL image, question, answer, meta) of sample ``index``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, TASKS.index(task), index])
    height, width = _size(rng, min_side, max_side)
    image, question, answer, meta = GENERATORS[task](rng, height, width)
    meta.update(task=task, question=question, answer=answer)
    return image, question, answer, meta


def write_synthetic(
    task: str,
    n: int,
    out: str,
    seed: int = 0,
    min_side: int = 256,
    max_side: int = 1536,
    shard_size: int = 256,
    quality: int = 90,
) -> dict:
    """Write ``n`` samples of ``task`` as shards + ``index.json`` into ``out``; returns the index."""
    if task not in GENERATORS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    writer = ShardSetWriter(out, shard_size, prefix=task)
    for i in range(n):
        image, question, answer, meta = make_sample(task, i, seed, min_side, max_side)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        conversations = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        record = {"conversations": conversations, "meta": meta}
        sample = {"__key__": f"{task}{i:08d}", "jpg": buffer.getvalue(),
                  "json": json.dumps(record).encode()}
        writer.write(sample, [(image.height, image.width)])
    return writer.close(task=task, seed=seed, min_side=min_side, max_side=max_side)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=1536)
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args(argv)
    index = write_synthetic(args.task, args.n, args.out, args.seed, args.min_side, args.max_side, args.shard_size)
    written = sum(s["samples"] for s in index["shards"])
    print(f"converted {written} {args.task} samples into {len(index['shards'])} shards in {args.out}; skipped 0")


if __name__ == "__main__":
    main()
