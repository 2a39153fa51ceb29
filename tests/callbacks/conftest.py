"""Shared fixtures: one tiny synthetic shard set per session and factories for tiny stage modules and fits."""

from __future__ import annotations

import pytest

from datamodules import write_synthetic
from llava_uhd.parts import PARTS

from ..helpers.fit import tiny_datamodule, tiny_fit

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
        return tiny_datamodule(data_dir / "train", **kwargs)

    return make


@pytest.fixture
def fit(make_datamodule, tmp_path):
    def run(module, callbacks, max_steps=3, datamodule=None, **trainer_kwargs):
        return tiny_fit(module, datamodule or make_datamodule(), tmp_path, callbacks, max_steps, **trainer_kwargs)

    return run
