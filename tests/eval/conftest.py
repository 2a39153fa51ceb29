"""Benchmark TSV files written by the tests (drawn images, base64 and shared-image rows) and predictions files."""

import json
from pathlib import Path

from llava_uhd.eval.tiny import b64_image, drawn_image, mcq_rows, vqa_rows, write_tsv

__all__ = ["b64_image", "drawn_image", "mcq_rows", "vqa_rows", "write_predictions", "write_tsv"]


def write_predictions(path: Path, predictions: dict) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for index, text in predictions.items():
            handle.write(json.dumps({"index": index, "prediction": text}, ensure_ascii=False) + "\n")
    return path
