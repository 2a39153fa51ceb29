"""A LoRA run SIGKILLed mid-epoch resumes from its (adapters-only) ``last.ckpt`` through the app and trains every
sample of the epoch exactly once, as a run without LoRA does (tests/test_exact_resume.py)."""

from __future__ import annotations

import pytest
import torch

from llava_uhd.build import ModelSettings, build_model

from ..helpers.app import checkpoint_dir
from ..test_exact_resume import ALL_KEYS, kill_after_checkpoint, one_epoch_args, resume, shards, trained_once

pytestmark = pytest.mark.slow

TINY_LLM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def tiny_base(app_data, tmp_path_factory):
    """The tiny overlay's model saved as a folder: the base the adapters train on."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(encoder="vit_uhd_tiny_patch10_siglip", llm=TINY_LLM,
                                      tokenizer=str(app_data / "tokenizer")))
    return model.save_pretrained(tmp_path_factory.mktemp("tiny_base") / "model")


def test_sigkill_then_resume_of_a_lora_run_trains_every_sample_once(app_data, tiny_base, tmp_path_factory, tmp_path):
    train = shards(tmp_path_factory, "workers0", (32, 64))
    args = one_epoch_args(app_data, train, tmp_path, 2, "--model.init_from", str(tiny_base), "--model.lora.r", "4")
    cut = kill_after_checkpoint(args, tmp_path, 2, 1)
    state = torch.load(checkpoint_dir(tmp_path) / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(".lora_A." in k for k in state) and not any(k.startswith("model.llm.") and ".lora_" not in k
                                                           and "rotary" not in k for k in state)
    resume(args, tmp_path)
    assert trained_once(tmp_path, cut, 1) == ALL_KEYS
