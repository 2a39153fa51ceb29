"""Fixtures every test folder may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_uhd.tokenizer import build_tiny_tokenizer

from .helpers.app import write_app_data


@pytest.fixture(scope="session")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training app's tiny data (shards, tokenizer, callbacks overlay), made once per session, read-only after."""
    return write_app_data(tmp_path_factory.mktemp("app_data"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny tokenizer, built once per session for the tests that only read it."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
