"""Predictions as JSON lines: one record per answered sample, written and flushed batch by batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class JSONLPredictionWriter(BasePredictionWriter):
    """Writes every record of ``predict_step``'s output (a list of dicts, see ``UHDModule.answer``) as one JSON
    line of ``output_path``, flushing after each batch so a long run can be followed and survives a crash.
    Under several ranks each writes ``<stem>.rank<r><suffix>`` (e.g. ``preds.rank1.jsonl``).
    """

    def __init__(self, output_path: str | Path) -> None:
        """
        Args:
            output_path: the JSONL file (parent folders are created); overwritten at each predict run.
        """
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self.records = 0

    def rank_path(self, trainer: L.Trainer) -> Path:
        if trainer.world_size <= 1:
            return self.output_path
        p = self.output_path
        return p.with_name(f"{p.stem}.rank{trainer.global_rank}{p.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self.rank_path(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self.records = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._file is None or prediction is None:
            return
        records = prediction if isinstance(prediction, list) else [prediction]
        for record in records:
            self._file.write(json.dumps(record, default=_to_json, ensure_ascii=False) + "\n")
        self.records += len(records)
        self._file.flush()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        log.info("wrote %d predictions to %s", self.records, self.path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
