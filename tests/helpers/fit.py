"""In-process fits of a stage module on tiny shards, with the settings the callback and release tests share: CPU,
no logger, no checkpoints, no progress bar; a DataModule on one shard folder with a 400-token budget, no worker
processes and no shuffling, so a few steps are fast and the same every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from datamodules import UHDDataModule


def tiny_datamodule(train_shards: str | Path, **overrides: Any) -> UHDDataModule:
    """A DataModule on ``train_shards``; ``overrides`` replace any of its settings."""
    defaults = dict(train_shards=str(train_shards), num_workers=0, batch_token_budget=400, max_length=1024,
                    sample_shuffle=0)
    return UHDDataModule(**{**defaults, **overrides})


def tiny_fit(module: L.LightningModule, datamodule: L.LightningDataModule, root: Path, callbacks: list[Callback],
             max_steps: int = 3, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``module`` for ``max_steps`` steps with ``callbacks``, writing only under ``root``; the trainer."""
    trainer = L.Trainer(**{
        "max_steps": max_steps, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
        "callbacks": callbacks, **trainer_kwargs,
    })
    trainer.fit(module, datamodule)
    return trainer
