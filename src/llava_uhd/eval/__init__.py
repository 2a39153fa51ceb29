"""Benchmarks from local VLMEvalKit TSV files: prompts, generation, and scoring as the field scores them.

``python -m llava_uhd.eval run | score | table`` (see :mod:`llava_uhd.eval.__main__`). The pieces:

- :mod:`.tsv`: reading a benchmark file (rows, options, answer lists, base64 / shared / path images) and its kind;
- :mod:`.prompts`: the VLMEvalKit prompt of a row for its kind;
- :mod:`.scoring`: per-row scorers and per-benchmark aggregation (also behind ``llava_uhd.metrics``);
- :mod:`.generation`: batched answers on a ``LlavaUHD`` through its public methods;
- :mod:`.run`: the resumable prediction loop; :mod:`.report`: scores.json, tables, charts.
"""

from llava_uhd.errors import EvalError

from .scoring import KINDS, RowScore, aggregate, score_row
from .tsv import Benchmark, read_benchmark

__all__ = ["KINDS", "Benchmark", "EvalError", "RowScore", "aggregate", "read_benchmark", "score_row"]
