"""Skipped samples on the console, and a training epoch that trained on nothing (or on too little) fails.

The loader counts every skipped sample by reason and each batch carries the new counts (``batch["skips"]``,
see ``datamodules.datamodule``). TensorBoard gets them from the LightningModule; this callback puts the
running total on the progress bar (``skipped``), prints one line per epoch (samples used, skipped by
reason), and hands the epoch's counts, summed over ranks, to the DataModule's ``check_training_data``, which
raises when nothing was used or more than ``data.max_skip_fraction`` was skipped. It runs at the end of
each epoch before ``ModelCheckpoint`` and ``ExportModel``, and before every checkpoint is written, so a
failed run leaves no ``last.ckpt`` and no export.
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import torch

from datamodules.samples import SKIP_REASONS

NOT_A_FAULT = ("epoch_overflow",)  # surplus batches dropped to keep ranks equal


class DataSkipReport(L.Callback):
    """Console view of skipped samples and the "trained on nothing / too many skips" check."""

    def __init__(self, check_every_n_batches: int = 50, early_check_samples: int = 1000) -> None:
        """
        Args:
            check_every_n_batches: also check during the epoch, every this many batches (the same batches on
                every rank), so a long run on mostly broken data stops early...
            early_check_samples: ...once this many samples were read (fewer make the share too noisy).
        """
        super().__init__()
        self.check_every_n_batches, self.early_check_samples = check_every_n_batches, early_check_samples
        self.used = 0
        self.skipped: Counter = Counter()
        self.epochs_checked = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.used, self.skipped = 0, Counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        if not isinstance(batch, dict):
            return
        keys = batch.get("keys")
        self.used += len(keys) if keys is not None else int(batch["input_ids"].shape[0])
        self.skipped.update({k: int(v) for k, v in (batch.get("skips") or {}).items() if v})
        faults = sum(v for k, v in self.skipped.items() if k not in NOT_A_FAULT)
        pl_module.log("skipped", float(faults), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                      batch_size=1)
        if self.check_every_n_batches > 0 and (batch_idx + 1) % self.check_every_n_batches == 0:
            used, skipped = self._totals(trainer, pl_module)
            check = getattr(trainer.datamodule, "check_training_data", None)
            if check is not None and used + sum(skipped.values()) >= self.early_check_samples:
                check(used, skipped)

    def _totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, dict[str, int]]:
        """This epoch's used samples and skips by reason, summed over ranks."""
        unbatched = getattr(trainer.datamodule, "unbatched_skips", None)  # workers whose samples all failed
        skipped = self.skipped + Counter(unbatched() if unbatched is not None else {})
        reasons = sorted(set(SKIP_REASONS) | set(skipped))
        local = torch.tensor([self.used] + [skipped.get(r, 0) for r in reasons], dtype=torch.float64,
                             device=pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum") if trainer.world_size > 1 else local
        values = [int(v) for v in total.tolist()]
        return values[0], {r: v for r, v in zip(reasons, values[1:]) if v}

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        used, skipped = self._totals(trainer, pl_module)
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        pl_module.print(f"epoch {trainer.current_epoch}: trained on {used} samples; skipped "
                        f"{sum(v for k, v in skipped.items() if k not in NOT_A_FAULT)} ({reasons})")
        self.epochs_checked += 1
        check = getattr(trainer.datamodule, "check_training_data", None)
        if check is not None:
            check(used, skipped)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Every rank saves together; a checkpoint of a run on mostly broken data is not written.
        if trainer.training:
            used, skipped = self._totals(trainer, pl_module)
            check = getattr(trainer.datamodule, "check_training_data", None)
            if check is not None and used:
                check(used, skipped)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A loader of length 0 skips the epoch loop (and its end hook) altogether: that run trained on nothing.
        asked_for_none = trainer.limit_train_batches == 0 or trainer.max_steps == 0 or trainer.max_epochs == 0
        if self.epochs_checked == 0 and trainer.global_step == 0 and not asked_for_none:
            self._check(trainer, pl_module)
