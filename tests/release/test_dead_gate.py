"""A fine-tuned release: its all-zero WTC gates are named by ZeroInitCheck; ``reinit_wtc_gate`` revives them."""

import pytest
import torch

from callbacks import ZeroInitCheck, ZeroInitError
from callbacks.wtc_modules import find_wtc
from datamodules import write_synthetic
from llava_uhd.stages import SFT
from llava_uhd.vision.pvc import average_pool_windows

from ..helpers.fit import tiny_datamodule, tiny_fit


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dead_gate_data")
    write_synthetic("shapegrid", 6, str(root / "train"), seed=0, min_side=32, max_side=96)
    return root / "train"


def module_from(release_dir, **kwargs):
    module = SFT(init_from=str(release_dir), llm="", **kwargs)
    module.model.config.min_pixels, module.model.config.max_pixels = 40 * 40, 120 * 120  # small CPU steps
    return module


def fit(module, shards, tmp_path, steps=1):
    tiny_fit(module, tiny_datamodule(shards), tmp_path, [ZeroInitCheck(check_start=False)], steps)


def test_release_gates_are_all_zero_and_the_check_names_the_case(release_dir, shards, tmp_path):
    module = module_from(release_dir)
    gates = find_wtc(module.model)
    assert len(gates) == 2 and all(not p.any() for _, m in gates for p in m.parameters())
    with pytest.raises(ZeroInitError) as err:
        fit(module, shards, tmp_path)
    message = str(err.value)
    assert "model.encoder.wtc.1" in message and "model.encoder.wtc.3" in message
    assert "fully zeroed" in message and "as the released LLaVA-UHD v3 ships it" in message
    assert "exactly zero gradient" in message and "--model.reinit_wtc_gate true" in message


def test_the_zeroed_gate_really_gets_no_gradient(release_model):
    """What the message claims: average pooling, and W1 / W2 get exactly zero gradient."""
    wtc = dict(find_wtc(release_model.encoder))["wtc.1"]
    x = torch.randn(3, 4 * 8, wtc.dim)
    out = wtc(x)
    assert torch.equal(out, average_pool_windows(x))
    (out * torch.randn_like(out)).sum().backward()
    assert not wtc.fc1.weight.grad.any() and not wtc.fc2.weight.grad.any()
    release_model.zero_grad(set_to_none=True)


def test_reinit_wtc_gate_gives_average_pooling_with_a_live_gradient(release_dir, shards, tmp_path):
    module = module_from(release_dir, reinit_wtc_gate=True)
    for _, wtc in find_wtc(module.model):
        assert wtc.fc1.weight.any() and not wtc.fc1.bias.any()
        assert not wtc.fc2.weight.any() and not wtc.fc2.bias.any()
        x = torch.randn(2, 16, wtc.dim)
        with torch.no_grad():
            assert torch.equal(wtc(x), average_pool_windows(x))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".wtc." in f".{n}"}
    fit(module, shards, tmp_path)  # ZeroInitCheck checks a non-zero gate gradient after the first backward
    after = dict(module.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("fc2.weight"))


def test_reinit_needs_a_content_adaptive_gate(release_dir):
    with pytest.raises(ValueError, match="model.reinit_wtc_gate: the encoder has no content-adaptive WTC gate"):
        SFT(encoder="vit_gne_tiny_patch14_siglip", llm={"hidden_size": 64}, tokenizer=str(release_dir.parent / "t"),
            projector="merger", reinit_wtc_gate=True)
