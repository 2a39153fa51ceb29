"""``--adapter DIR``: a LoRA run's adapter folder goes on ``--model`` unmerged, and the app then answers as
``LlavaUHD.from_pretrained(model, adapter=DIR).generate`` does; a folder that is not an adapter is one message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_uhd.app.__main__ import load, main, parser
from llava_uhd.app.engines import Conversation
from llava_uhd.app.uploads import Limits, read_upload
from llava_uhd.lora import LoraSettings, apply_lora
from llava_uhd.mllm import LlavaUHD

from .conftest import MAX_NEW_TOKENS, reference_answer

QUESTION = "What is the building?"


@pytest.fixture(scope="module")
def adapter_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LLM adapter on the demo model, its B matrices drawn at random (LoRA starts as a no-op) so it matters."""
    model = LlavaUHD.from_pretrained(demo_model_dir)
    apply_lora(model, LoraSettings(r=4, apply_to=["llm"]), base=str(demo_model_dir))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.save_pretrained(tmp_path_factory.mktemp("adapter") / "lora")


def test_the_app_answers_with_the_adapter(demo_model_dir, adapter_dir, reference_model, photo):
    args = parser().parse_args(["--model", str(demo_model_dir), "--adapter", str(adapter_dir), "--device", "cpu"])
    model, engine, _ = load(args)
    upload = read_upload(photo, Limits())
    turns = Conversation((upload,)).prompt(QUESTION)
    answer = list(engine.answer([upload], turns, 1, MAX_NEW_TOKENS))[-1].text
    adapted = LlavaUHD.from_pretrained(demo_model_dir, adapter=adapter_dir).eval()
    expected = adapted.generate(Image.open(photo), QUESTION, max_new_tokens=MAX_NEW_TOKENS).text
    assert answer == expected != reference_answer(reference_model, photo, QUESTION)
    assert model.lora is not None


@pytest.mark.parametrize("adapter, message", [
    ("no/such/adapter", "error: --adapter: no adapter folder at no/such/adapter"),
    ("{model}", "is not an adapter folder"),
])
def test_a_bad_adapter_is_one_message(capsys, demo_model_dir, adapter, message):
    code = main(["--model", str(demo_model_dir), "--adapter", adapter.format(model=demo_model_dir)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err
