"""Fixtures every test folder may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llava_uhd.tokenizer import build_tiny_tokenizer

from .helpers.app import write_app_data

# As in the training app: loader workers forked after tokenizer use would each warn and turn HF tokenizers'
# thread pool off; the workers are the parallelism.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training app's tiny data (shards, tokenizer, callbacks overlay), made once per session, read-only after."""
    return write_app_data(tmp_path_factory.mktemp("app_data"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny tokenizer, built once per session for the tests that only read it."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
