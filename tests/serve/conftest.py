"""Servers for the serving tests: one per tiny model folder, started once per session, side by side.

Each runs ``python -m llava_uhd.serve`` from .venv-serve (``make serve-env``; ``make test`` builds it) as a
subprocess on 127.0.0.1; the tests talk HTTP from this environment, which never imports vLLM.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from llava_uhd.serve.client import SERVE_PYTHON, Server

from .folders import write_serving_export, write_serving_release


def photo_bytes() -> list[bytes]:
    """Real photos (scikit-learn's samples) at several sizes, as JPEG files."""
    from sklearn.datasets import load_sample_image

    china, flower = (Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg"))
    photos = [china, flower.crop((100, 50, 400, 250)), china.crop((0, 0, 150, 420)), flower.crop((200, 100, 640, 300))]
    out = []
    for p in photos:
        buffer = io.BytesIO()
        p.save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="session")
def photos() -> list[bytes]:
    return photo_bytes()


@pytest.fixture(scope="session")
def serve_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {"release": write_serving_release(root / "llava-uhd-v3", root / "qwen2_tokenizer"),
            "export": write_serving_export(root / "exported", root / "tokenizer", projector="merger")}


@pytest.fixture(scope="session")
def servers(serve_folders, tmp_path_factory):
    """{"release": Server, "export": Server}, both up; stopped at the end of the session."""
    if not SERVE_PYTHON.is_file():
        pytest.skip("no serving environment (.venv-serve): run `make serve-env` (make test builds it)")
    logs = tmp_path_factory.mktemp("serve_logs")
    made = {k: Server(f, "--max-model-len", "2048", "--max-image-pixels", "20000000", log=logs / f"{k}.log")
            for k, f in serve_folders.items()}
    errors = {}
    for s in made.values():  # launched from this (the main) thread: they boot side by side
        s.launch()
    for k, s in made.items():
        try:
            s.wait_ready()
        except (RuntimeError, TimeoutError) as err:
            errors[k] = err
    if errors:
        for s in made.values():
            s.stop()
        logs_text = {k: (logs / f"{k}.log").read_text()[-3000:] for k in made}
        raise RuntimeError(f"a server did not start: {errors}\n{logs_text}")
    yield made
    for s in made.values():
        s.stop()
