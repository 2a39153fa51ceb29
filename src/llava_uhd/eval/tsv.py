"""VLMEvalKit benchmark TSV files: rows, options, answer lists, images, and the benchmark's kind.

One row per question with columns ``index``, ``question``, ``answer`` (absent in test splits), ``image``
(base64) or ``image_path``, and for multiple choice ``A``, ``B``, ... plus optional ``hint``, ``category``,
``l2-category``, ``split``. A row may reuse another row's image by putting that row's ``index`` in ``image``
(VLMEvalKit writes short values: a base64 image is never that short). Empty cells are missing values, as
pandas reads them. The benchmark is named by the file stem and its kind (how it is prompted and scored)
follows the name as VLMEvalKit's dataset table does; ``kind=`` overrides.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from llava_uhd.errors import EvalError
from llava_uhd.vision.resize import to_rgb

MAX_IMAGE_PIXELS = 16384 * 16384
"""Images whose header claims more pixels are refused before decoding (a decompression bomb)."""
_REFERENCE_MAX_LEN = 64
"""``image`` cells this short are another row's index, not base64 (VLMEvalKit's rule)."""
_MISSING = {"", "nan", "none", "null"}

KINDS = ("vqa", "anls", "relaxed", "exact", "mcq", "yesno", "pope", "mme", "hallusion", "ocrbench")
"""Scoring kinds (``llava_uhd.eval.scoring`` scores each); a benchmark file is read with the columns its kind needs."""

# Kind by benchmark name, first match wins (lowercased substring; VLMEvalKit names its files this way).
_NAME_KINDS = (
    ("ocrbench", "ocrbench"),
    ("textvqa", "vqa"),
    ("docvqa", "anls"),
    ("infovqa", "anls"),
    ("chartqa", "relaxed"),
    ("ocrvqa", "exact"),
    ("gqa", "exact"),
    ("pope", "pope"),
    ("hallusionbench", "hallusion"),
    ("mme-realworld", "mcq"),
    ("mmbench", "mcq"),
    ("ccbench", "mcq"),
    ("ai2d", "mcq"),
    ("seed", "mcq"),
    ("scienceqa", "mcq"),
    ("mmstar", "mcq"),
    ("realworldqa", "mcq"),
    ("mmmu", "mcq"),
    ("blink", "mcq"),
    ("cv-bench", "mcq"),
)


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in _MISSING


def kind_from_name(name: str, columns: list[str] | None = None) -> str | None:
    """The scoring kind VLMEvalKit gives a benchmark of this name (None: unknown name and no options)."""
    return picked_kind(name, columns)[0]


def picked_kind(name: str, columns: list[str] | None = None) -> tuple[str | None, str]:
    """:func:`kind_from_name` and why: ``("vqa", "its name contains 'textvqa'")``; ``(None, "")`` when unknown."""
    lowered = name.lower()
    if lowered == "mme" or re.match(r"mme[_\-]", lowered) and not lowered.startswith("mme-realworld"):
        return "mme", "its name starts with 'mme'"
    for key, kind in _NAME_KINDS:
        if key in lowered:
            return kind, f"its name contains {key!r}"
    if columns is not None and "A" in columns and "B" in columns:
        return "mcq", "its name is not a known benchmark's and it has option columns A and B"
    return None, ""


@dataclass
class Benchmark:
    """A benchmark file in memory: rows as ``{column: text}`` in file order, looked up by ``index``."""

    name: str
    path: Path
    kind: str
    columns: list[str]
    rows: list[dict[str, str]]
    by_index: dict[str, dict[str, str]] = field(default_factory=dict)
    kind_reason: str = ""
    """Why the kind was picked (``its name contains 'textvqa'``); empty when the caller gave the kind."""

    def __post_init__(self) -> None:
        self.by_index = {}
        for number, row in enumerate(self.rows, start=2):  # line 1 is the header
            key = row["index"]
            if key in self.by_index:
                raise EvalError(f"{self.path}: index {key!r} appears twice (second time on line {number})")
            self.by_index[key] = row

    @property
    def has_answers(self) -> bool:
        return "answer" in self.columns

    def options(self, row: dict[str, str]) -> dict[str, str]:
        """``{letter: text}`` of the row's non-empty option columns, in letter order."""
        return {c: row[c] for c in string.ascii_uppercase if c in row and not is_missing(row[c])}

    def answers(self, row: dict[str, str]) -> list[str]:
        """The row's accepted answers: a JSON / Python list literal, or the cell itself."""
        return parse_answers(row.get("answer", ""), f"{self.path} row {row['index']}")

    def image_source(self, row: dict[str, str]) -> str:
        """Index of the row whose image this row shows (itself, unless ``image`` names another row)."""
        value = row.get("image", "")
        if "image" in row and len(value) <= _REFERENCE_MAX_LEN and not is_missing(value):
            if value not in self.by_index:
                raise EvalError(f"{self.path} row {row['index']}: image refers to index {value!r}, "
                                f"which is not in the file")
            return value
        return row["index"]

    def image_key(self, row: dict[str, str]) -> str:
        """What identifies the row's image for per-image scores (MME pairs): ``image_path``, else its source."""
        path = row.get("image_path", "")
        return path if not is_missing(path) else self.image_source(row)

    def load_image(self, row: dict[str, str]) -> Image.Image:
        """The row's image as RGB; :class:`EvalError` naming the row when it cannot be read."""
        where = f"{self.path} row {row['index']}"
        if "image" in row and not is_missing(row["image"]):
            source = self.by_index[self.image_source(row)]
            data = source["image"]
            if len(data) <= _REFERENCE_MAX_LEN:
                raise EvalError(f"{where}: image refers to row {source['index']}, whose image is itself a reference")
            try:
                raw = base64.b64decode(data, validate=False)
            except (binascii.Error, ValueError) as err:
                raise EvalError(f"{where}: image is not valid base64 ({err})") from err
            return _open(io.BytesIO(raw), where)
        path = row.get("image_path", "")
        if is_missing(path):
            raise EvalError(f"{where}: no image (empty 'image' and 'image_path')")
        file = Path(path) if Path(path).is_absolute() else self.path.parent / path
        if not file.is_file():
            raise EvalError(f"{where}: image_path {path!r} not found (looked at {file})")
        return _open(file, where)


def _open(source, where: str) -> Image.Image:
    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise EvalError(f"{where}: image claims {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} limit")
        image.load()  # decode now, inside this try: a truncated file is this row's error
        return to_rgb(image)  # the product's conversion: 16-bit keeps its range, alpha on white, as in training
    except EvalError:
        raise
    except Exception as err:  # PIL raises many types for undecodable bytes
        raise EvalError(f"{where}: undecodable image ({type(err).__name__}: {err})") from err


def parse_answers(value: str, where: str = "answer") -> list[str]:
    """``"['a', 'b']"`` / ``'["a"]'`` -> list (json, then ``ast.literal_eval``; never ``eval``); else ``[value]``."""
    text = (value or "").strip()
    if text.startswith("[") and text.endswith("]"):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, list):
                return [str(item) for item in parsed]
        raise EvalError(f"{where}: answer {text[:60]!r} looks like a list but is not a valid literal")
    return [value or ""]


def read_benchmark(path: str | Path, kind: str | None = None) -> Benchmark:
    """Read a VLMEvalKit TSV; the columns its kind needs are checked here, so a bad file fails at once."""
    path = Path(path)
    if path.is_dir():
        raise EvalError(f"--data {path}: a folder, not a benchmark file (give each .tsv with its own --data)")
    if not path.is_file():
        raise EvalError(f"benchmark file not found: {path}")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, None)
            if not header:
                raise EvalError(f"{path}: empty file (no header row)")
            header = [h.strip() for h in header]
            rows = []
            for number, cells in enumerate(reader, start=2):
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise EvalError(f"{path} line {number}: {len(cells)} cells for {len(header)} columns")
                rows.append(dict(zip(header, cells)))
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({err})") from err
    except csv.Error as err:
        raise EvalError(f"{path}: not a readable TSV ({err})") from err
    missing = [c for c in ("index", "question") if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image (or image_path)")
    if missing:
        raise EvalError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
    if not rows:
        raise EvalError(f"{path}: a header and no rows: nothing to answer")
    name = path.stem
    reason = ""
    if kind is None:
        kind, reason = picked_kind(name, header)
        if kind is None:
            raise EvalError(f"{path}: cannot tell the kind of benchmark {name!r} from its name; "
                            f"pass --kind (one of {', '.join(KINDS)})")
    elif kind not in KINDS:
        raise EvalError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    if kind == "mcq" and not ("A" in header and "B" in header):
        raise EvalError(f"{path}: multiple-choice benchmark {name!r} has no option columns A and B")
    return Benchmark(name=name, path=path, kind=kind, columns=header, rows=rows, kind_reason=reason)
