"""The web demo's test fixtures: a tiny model folder whose WTC gates are not average pooling, a real photo, the app
served on a free loopback port, and the reference answer ``LlavaUHD.generate`` gives for an image and question."""

from __future__ import annotations

import importlib.resources
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_uhd.llm import tiny_qwen2_config
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
from llava_uhd.tokenizer import build_tiny_tokenizer

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # as the app's entry sets it, before any test imports gradio

MAX_NEW_TOKENS = 6
"""Answer length in these tests: enough to see a streamed, multi-token answer, cheap on a 2-core CPU."""


def make_model(tokenizer_dir: Path, seed: int = 0) -> LlavaUHD:
    """Tiny ViT-UHD (patch 10, WTC after blocks 2 and 4: 40 px per token) + mlp projector + tiny Qwen2, with random
    gate weights: the content-adaptive gate starts as exact average pooling (W2 = 0), so W2 is drawn at random here
    to make the 2x2 windows of a picture weigh their four tokens differently."""
    torch.manual_seed(seed)
    llm = tiny_qwen2_config(1024, hidden_size=64, layers=2, initializer_range=0.2)
    config = LlavaUHDConfig(encoder="vit_uhd_tiny_patch10_siglip", projector="mlp", llm=llm,
                            tokenizer=str(tokenizer_dir), min_pixels=80 * 80, max_pixels=240 * 360)
    model = LlavaUHD(config).eval()
    with torch.no_grad():
        for wtc in model.encoder.wtc.values():
            wtc.fc1.weight.normal_(0, 0.3)
            wtc.fc2.weight.normal_(0, 1.0)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny ops gain nothing from threads, and on a shared 2-core machine spinning OpenMP threads cost several x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as a folder the app loads (``save_pretrained``), once per session."""
    root = tmp_path_factory.mktemp("demo_model")
    build_tiny_tokenizer(root / "tokenizer")
    return make_model(root / "tokenizer").save_pretrained(root / "model")


@pytest.fixture(scope="session")
def reference_model(demo_model_dir: Path) -> LlavaUHD:
    """The same folder loaded here: the answers the app must give are this model's ``generate``."""
    return LlavaUHD.from_pretrained(demo_model_dir).eval()


def reference_answer(model: LlavaUHD, image_path: Path | None, question: str, **kwargs) -> str:
    """``LlavaUHD.generate`` for one image (opened as a user would) and one question."""
    images = Image.open(image_path) if image_path is not None else None
    return model.generate(images, question, max_new_tokens=MAX_NEW_TOKENS, **kwargs).text


@pytest.fixture(scope="session")
def photo() -> Path:
    """A real photograph (JPEG, 427x640) that scikit-learn ships."""
    path = importlib.resources.files("sklearn.datasets") / "images" / "china.jpg"
    return Path(str(path))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*argv: str):
    """The app started as ``python -m llava_uhd.app ARGV`` starts it, on a free port, without blocking."""
    from llava_uhd.app.__main__ import parser, serve

    args = parser().parse_args([*argv, "--port", str(free_port())])
    demo = serve(args, block=False)
    return demo, f"http://127.0.0.1:{args.port}/"


@pytest.fixture(scope="module")
def app_url(demo_model_dir: Path) -> Iterator[str]:
    """One in-process app per test module that asks for it."""
    demo, url = serve("--model", str(demo_model_dir), "--device", "cpu", "--max-new-tokens", str(MAX_NEW_TOKENS),
                      "--max-file-mb", "2", "--max-image-pixels", "4000000")
    yield url
    demo.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Gradio's queue calls pandas options pandas 3 deprecates; not the app's to fix."""
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning"))
