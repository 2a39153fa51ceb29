"""Synthetic benchmark data with exact answers: ShapeGrid, TextGrid and Caption.

General benchmark data (after the paper's ShapeGrid): images of every size from ``min_side`` to
``max_side`` pixels per side and aspect ratios from 1:4 to 4:1, each with one question whose answer is
checked by exact match. ``meta`` records the task, question, answer and the grid position(s) involved.

* ``shapegrid``: a grid of coloured shapes (some cells empty). "What is at row r, column c?" -> "red
  circle", or "How many red circles are there?" -> "3".
* ``textgrid``: a grid of words (OCR). "What word is at row r, column c?" -> "apple".
* ``caption``: a few shapes in a row. "Describe the scene." -> "a red circle, a blue square and a green
  star on a white background." (objects listed left to right).

Deterministic: sample ``i`` depends only on ``(seed, i)``. :func:`pilot_sample` draws the pilot experiment's
fixed-layout tasks (``llava_uhd.bench.pilot``), built so that a slice cut runs through known cells.

    python -m datamodules.synthetic --task shapegrid --n 1000 --out data/shapegrid --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datamodules.writer import ShardSetWriter
from llava_uhd.arguments import positive_int

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
PILOT_SHAPE_PAD = 0.15
"""Margin of a pilot shape inside its cell: a cell is *cut* when a slice boundary crosses the shape itself."""


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


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour) -> None:
    """Fill ``shape`` (one of ``SHAPES``) inside ``box`` (x0, y0, x1, y1), centred, as large as the box allows."""
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


def cell_box(height: int, width: int, rows: int, cols: int, r: int, c: int, pad: float = 0.15):
    """(x0, y0, x1, y1) of cell (r, c) of a ``rows x cols`` grid, ``pad`` of the cell left free on every side."""
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
                draw_shape(draw, grid[(r, c)][1], cell_box(height, width, rows, cols, r, c), COLOURS[grid[(r, c)][0]])
    if not grid:
        grid[(0, 0)] = ("red", "circle")
        draw_shape(draw, "circle", cell_box(height, width, rows, cols, 0, 0), COLOURS["red"])
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
        draw_shape(draw, shape, (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), COLOURS[colour])
        objects.append({"colour": colour, "shape": shape, "col": i + 1})
    phrases = [f"a {o['colour']} {o['shape']}" for o in objects]
    listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    answer = f"{listed} on a {background} background."
    return image, "Describe the scene.", answer, {"kind": "caption", "objects": objects, "background": background}


@dataclass(frozen=True)
class PilotData:
    """The pilot's fixed ShapeGrid layout: square images of ``min_side..max_side`` px, a ``grid x grid`` layout.

    With the default 224 px and a 3x3 grid, the tiny slice-based encoder's 2x2 slices of 112 px meet at the
    image's middle lines, which run through the centres of the middle row and column: those 5 cells hold shapes
    centred on a slice cut, the 4 corner cells hold shapes that lie inside one slice.
    """

    grid: int = 3
    min_side: int = 224
    max_side: int = 224
    train: int = 1536
    test: int = 360
    seed: int = 0
    quality: int = 90
    question: str = "where"
    """The task, one of ``PILOT_QUESTIONS`` (see :func:`pilot_sample`)."""
    question_first: bool = True
    """Put the question before the image in the prompt, so that image tokens can attend to it (causal LLM)."""


PILOT_QUESTIONS = ("where", "kind", "position", "marked")
PILOT_SPLITS = ("train", "test")
WHERE_QUESTION = "Where is the shape? Answer with its row and column."
KIND_QUESTION = f"Which shape is it? Answer with one of: {', '.join(SHAPES)}."


def pilot_sample(index: int, seed: int, spec: PilotData, split: str = "train"):
    """(PIL image, prompt, answer, meta) of sample ``index`` of the pilot task ``spec.question``.

    A pure function of its arguments; ``split`` keeps train and held-out samples of one seed apart.

    - ``where``: one shape (random colour and kind) in a random cell; the answer is its place, "row 2, column 3".
    - ``kind``: one shape in a random cell; the answer is its kind ("star"). In a cut cell (see
      :class:`PilotData`) the shape sits across the slice cut, so each slice holds only part of its outline:
      the kind is what a cut destroys, the colour would survive it.
    - ``position``: every cell filled, the question names a cell, the answer is that shape's colour.
    - ``marked``: every cell filled, the asked cell framed in black (no black shapes then), answer its colour.

    The prompt holds ``<image>``, after the question when ``question_first``.
    """
    if spec.question not in PILOT_QUESTIONS:
        raise ValueError(f"question: unknown {spec.question!r}; choose one of {PILOT_QUESTIONS}")
    if split not in PILOT_SPLITS:
        raise ValueError(f"split: unknown {split!r}; choose one of {PILOT_SPLITS}")
    rng = np.random.default_rng([seed, 7919, PILOT_SPLITS.index(split), index])
    side = int(rng.integers(spec.min_side, spec.max_side + 1))
    image = Image.new("RGB", (side, side), BACKGROUNDS["white"])
    draw = ImageDraw.Draw(image)
    colours = [c for c in COLOURS if spec.question != "marked" or c != "black"]
    grid, cells = spec.grid, {}
    filled = [(r, c) for r in range(grid) for c in range(grid)]
    if spec.question in ("where", "kind"):
        filled = [filled[rng.integers(len(filled))]]
    for r, c in filled:
        colour, shape = colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))]
        cells[(r, c)] = (colour, shape)
        draw_shape(draw, shape, cell_box(side, side, grid, grid, r, c, PILOT_SHAPE_PAD), COLOURS[colour])
    if spec.question in ("where", "kind"):
        (r, c), (colour, shape) = next(iter(cells.items()))
        if spec.question == "where":
            question, answer = WHERE_QUESTION, f"row {r + 1}, column {c + 1}"
        else:
            question, answer = KIND_QUESTION, shape
    else:
        r, c = int(rng.integers(grid)), int(rng.integers(grid))
        answer = cells[(r, c)][0]
        if spec.question == "marked":
            draw.rectangle(cell_box(side, side, grid, grid, r, c, 0.05), outline=COLOURS["black"],
                           width=max(2, side // 60))
            question = "What colour is the shape in the black frame?"
        else:
            question = f"What colour is the shape at row {r + 1}, column {c + 1}?"
    question = f"{question}\n<image>" if spec.question_first else f"<image>\n{question}"
    meta = {"task": "shapegrid", "kind": spec.question, "rows": grid, "cols": grid, "row": r + 1, "col": c + 1,
            "height": side, "width": side, "colour": cells[(r, c)][0], "shape": cells[(r, c)][1],
            "question": question, "answer": answer}
    return image, question, answer, meta


def pilot_chance(spec: PilotData) -> float:
    """Accuracy of guessing: one of grid^2 places, one of the shape kinds, or one of the colours."""
    if spec.question == "where":
        return 1 / spec.grid**2
    if spec.question == "kind":
        return 1 / len(SHAPES)
    return 1 / (len(COLOURS) - (spec.question == "marked"))


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
    """CLI; a mistake (a count under 1, bad sides, an output folder that already holds files) is one parser
    error and exit status 2, before anything is written."""
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--n", type=positive_int, required=True, help="samples to write")
    parser.add_argument("--out", required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=positive_int, default=256)
    parser.add_argument("--max-side", type=positive_int, default=1536)
    parser.add_argument("--shard-size", type=positive_int, default=256, help="samples per shard")
    args = parser.parse_args(argv)
    if not 16 <= args.min_side <= args.max_side:
        parser.error(f"--min-side / --max-side: need 16 <= min-side <= max-side, got {args.min_side}, "
                     f"{args.max_side}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        parser.error(f"--out: {args.out} is not a new or empty folder (it may hold another shard set, which "
                     "training would read beside this one); choose a new folder")
    index = write_synthetic(args.task, args.n, args.out, args.seed, args.min_side, args.max_side, args.shard_size)
    written = sum(s["samples"] for s in index["shards"])
    print(f"converted {written} {args.task} samples into {len(index['shards'])} shards in {args.out}; skipped 0")


if __name__ == "__main__":
    main()
