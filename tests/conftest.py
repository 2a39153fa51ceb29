"""Fixtures every test folder may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers.app import write_app_data


@pytest.fixture(scope="session")
def app_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training app's tiny data (shards, tokenizer, callbacks overlay), made once per session, read-only after."""
    return write_app_data(tmp_path_factory.mktemp("app_data"))
