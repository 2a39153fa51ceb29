"""The memory planner: counts on the meta device (nothing allocated), its columns follow the settings, and its
command's mistakes are one message each."""

from __future__ import annotations

import pytest
import yaml

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.memory_plan import per_gpu, plan


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    config = {"trainer": {"precision": "32-true"},
              "model": {"class_path": "llava_uhd.stages.SFT", "init_args": {
                  "encoder": "vit_uhd_tiny_patch10_siglip", "llm": {"hidden_size": 64, "num_hidden_layers": 2,
                                                                    "num_attention_heads": 4,
                                                                    "num_key_value_heads": 2},
                  "tokenizer": str(root / "tok"), "trainable": ["projector"],
                  "lora": {"r": 4, "apply_to": ["llm"]}}},
              "data": {"init_args": {"max_pixels": 120 * 120, "batch_token_budget": 64, "max_batch_size": 2,
                                     "max_length": 64}}}
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_planner_counts_weights_exactly_and_lora_saves_the_optimizer(micro):
    shape, traces = plan([str(micro)], modes=("full", "lora", "qlora"), checkpointing=(False,))
    full, lora, qlora = traces
    assert shape.source == "the settings' model.llm"
    assert full.tokens == 2 * 64  # 2 images of 120 px (9 tokens each) and 64-token samples
    assert lora.trainable < full.trainable and lora.optimizer == 2 * lora.gradients < full.optimizer
    assert qlora.weights < lora.weights and qlora.trainable == lora.trainable
    assert full.activations > 0
    one, ddp, fsdp2 = (per_gpu(full, g, s) for g, s in ((1, "ddp"), (4, "ddp"), (4, "fsdp2")))
    assert ddp.gradients == 2 * one.gradients and fsdp2.optimizer == one.optimizer / 4 and fsdp2.total < one.total


@pytest.mark.parametrize(("args", "message"), [
    (["-c", "nope.yaml"], "-c: no config file at nope.yaml"),
    ([], "-c: give the run's config files"),
    (["-c", "MICRO", "--modes", "ful"], "--modes: choose from full, lora, qlora"),
    (["-c", "MICRO", "--strategy", "fsdp2"], "--strategy fsdp2: shards over 2 or more GPUs"),
])
def test_mistakes_are_one_message(micro, capsys, args, message):
    args = [str(micro) if a == "MICRO" else a for a in args]
    assert main(["memory", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("args", [["--gpus", "0"], ["--gpus", "x"], ["--strategy", "fsdp"]])
def test_bad_options_are_the_parsers_message(micro, capsys, args):
    with pytest.raises(SystemExit) as done:
        main(["memory", "-c", str(micro), *args])
    assert done.value.code == 2
