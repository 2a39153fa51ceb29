"""Shared fixtures: one tiny synthetic shard set per session and factories for tiny stage modules and fits."""

from __future__ import annotations

import lightning as L
import pytest

from datamodules import UHDDataModule, write_synthetic
from llava_uhd.stages import PARTS

HIGH_LR = {part: 1e-2 for part in PARTS}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("callbacks_data")
    write_synthetic("shapegrid", 12, str(root / "train"), seed=0, min_side=32, max_side=128)
    return root


@pytest.fixture
def make_module(data_dir):
    def make(cls, **kwargs):
        defaults = dict(encoder="vit_uhd_tiny_patch10_siglip", llm={"hidden_size": 64}, tokenizer=str(data_dir / "tok"),
                        projector="mlp")
        module = cls(**{**defaults, **kwargs})
        # Small images (40-120 px, multiples of 40) instead of the 512^2 minimum area: fast CPU steps.
        module.model.config.min_pixels, module.model.config.max_pixels = 40 * 40, 120 * 120
        return module

    return make


@pytest.fixture
def make_datamodule(data_dir):
    def make(**kwargs):
        defaults = dict(train_shards=str(data_dir / "train"), num_workers=0, batch_token_budget=400, max_length=1024,
                        sample_shuffle=0)
        return UHDDataModule(**{**defaults, **kwargs})

    return make


@pytest.fixture
def fit(make_datamodule, tmp_path):
    def run(module, callbacks, max_steps=3, datamodule=None, **trainer_kwargs):
        trainer = L.Trainer(**{
            "max_steps": max_steps, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": callbacks, **trainer_kwargs,
        })
        trainer.fit(module, datamodule or make_datamodule())
        return trainer

    return run
