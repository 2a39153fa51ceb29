"""A VLMEvalKit benchmark TSV as the validation set of a training run (``--data.val_tsv FILE.tsv``).

Each row becomes one sample in the pipeline's batch layout (``datamodules.batching.collate``): the prompt
the benchmark asks (``llava_uhd.eval.prompts``) with the row's image, tokenised with its first answer as the
reply (so ``val/loss`` is the answer's loss), and ``meta`` holding ``question`` (the prompt that
``UHDModule.answer`` generates from), ``benchmark`` and ``index``. The LightningModule scores the generated
answers with ``llava_uhd.metrics.BenchmarkScores`` over the same TSV, logged as ``val/<bench>/<metric>``.

Ranks take every ``world_size``-th row and pad their share with repeats of their first rows to the same
count (so every rank runs the same number of steps); the metric drops the repeats. Rows whose image cannot
be read are skipped with a warning naming them.
"""

from __future__ import annotations

import logging
import math
from functools import partial

from torch.utils.data import DataLoader, Dataset

from datamodules.batching import collate
from datamodules.samples import Sample
from llava_uhd.conversation import IMAGE_PLACEHOLDER, tokenize_conversation
from llava_uhd.errors import EvalError, SettingsError
from llava_uhd.eval.prompts import build_prompt
from llava_uhd.eval.tsv import Benchmark, read_benchmark
from llava_uhd.vision.resize import preprocess, upright_size

log = logging.getLogger(__name__)


class TSVRows(Dataset):
    """One rank's rows of a benchmark, as tokenised samples (None for a row whose image cannot be read)."""

    def __init__(self, benchmark: Benchmark, tokenizer, policy, image_token_fn, max_length: int,
                 vision_markers: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.benchmark = benchmark
        self.tokenizer, self.policy, self.image_token_fn = tokenizer, policy, image_token_fn
        self.max_length, self.vision_markers = max_length, vision_markers
        mine = benchmark.rows[rank::world_size]
        share = math.ceil(len(benchmark.rows) / world_size)
        self.rows = (mine * (share // max(len(mine), 1) + 1))[:share] if mine else []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> Sample | None:
        row = self.rows[item]
        try:
            image = self.benchmark.load_image(row)
        except EvalError as err:
            log.warning("val_tsv: skipping %s", err)
            return None
        pixels = preprocess(image, self.policy)
        prompt = build_prompt(self.benchmark, row)
        answer = self.benchmark.answers(row)[0] if self.benchmark.has_answers else ""
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"}, {"from": "gpt", "value": answer}]
        tokens = tokenize_conversation(turns, self.tokenizer, [self.image_token_fn(*pixels.shape[-2:])],
                                       self.max_length, vision_markers=self.vision_markers)
        meta = {"question": prompt, "benchmark": self.benchmark.name, "index": row["index"],
                "task": self.benchmark.name}
        return Sample(key=f"{self.benchmark.name}/{row['index']}", pixel_values=[pixels],
                      orig_sizes=[upright_size(image)], input_ids=tokens.input_ids, labels=tokens.labels,
                      meta=meta)


def _collate(samples: list[Sample | None], pad_token_id: int) -> dict:
    kept = [s for s in samples if s is not None]
    if not kept:
        return {"input_ids": None}
    return collate(kept, pad_token_id)


def read_val_tsv(path: str, key: str = "data.val_tsv") -> Benchmark:
    """The benchmark, or a settings error naming the option."""
    try:
        benchmark = read_benchmark(path)
    except EvalError as err:
        raise SettingsError(f"{key}: {err}") from err
    if not benchmark.has_answers:
        raise SettingsError(f"{key}: {path} has no 'answer' column, so it cannot be scored")
    return benchmark


def tsv_loader(benchmark: Benchmark, tokenizer, policy, image_token_fn, max_length: int, batch_size: int,
               vision_markers: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    """DataLoader over one rank's rows, in file order, batches in the pipeline's layout."""
    dataset = TSVRows(benchmark, tokenizer, policy, image_token_fn, max_length, vision_markers, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=partial(_collate, pad_token_id=tokenizer.pad_token_id))
