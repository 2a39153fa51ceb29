"""Loading base ViT weights: timm / open_clip / Hugging Face layouts, RPE at load, clear errors."""

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

import llava_uhd.vision  # noqa: F401
from llava_uhd.vision.pvc import refine_patch_embed
from llava_uhd.vision.weights import read_state_dict

from ..helpers.vit import hf_layout, timm_reference


@pytest.fixture(scope="module")
def reference():
    return timm_reference()


def _tokens(model, image):
    with torch.no_grad():
        return model.eval()(image).tokens


@pytest.mark.parametrize("layout", ["timm_bin", "open_clip", "hf"])
def test_every_layout_loads_to_the_same_model(tmp_path, reference, layout):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if layout == "timm_bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save({"state_dict": state}, path)
    elif layout == "open_clip":
        path = tmp_path / "open_clip_model.safetensors"
        save_file({"visual.trunk." + k: v for k, v in state.items()} | {"text.proj": torch.zeros(2)}, str(path))
    else:
        path = tmp_path / "model.safetensors"
        save_file(hf_layout(state), str(path))
    model = timm.create_model("vit_gne_tiny_patch14_siglip", pretrained_path=str(path))
    image = torch.randn(1, 3, 112, 84)
    with torch.no_grad():
        expected = reference.forward_features(image)
    torch.testing.assert_close(_tokens(model, image), expected, atol=1e-5, rtol=0)
    assert model.load_report.missing == []


def test_rpe_is_applied_at_load_and_wtc_reported_as_new(tmp_path, reference, caplog):
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with caplog.at_level(logging.INFO, logger="llava_uhd.vision.weights"):
        model = timm.create_model("vit_uhd_tiny_patch10_siglip", pretrained_path=str(path))
    expected = refine_patch_embed(reference.patch_embed.proj.weight.detach(), 10)
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected)
    report = model.load_report
    assert any("14 -> 10" in r for r in report.resampled)
    assert report.new_modules and all(k.startswith("wtc.") for k in report.new_modules)
    assert report.missing == []
    assert any(k.startswith("attn_pool.") for k in report.unexpected)
    assert "attn_pool" in caplog.text  # unused tensors are named in the log


def test_missing_keys_are_reported_by_name(tmp_path, reference, caplog):
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if not k.startswith("blocks.5.mlp")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.WARNING, logger="llava_uhd.vision.weights"):
        model = timm.create_model("vit_gne_tiny_patch14_siglip", pretrained_path=str(path))
    assert "blocks.5.mlp.fc1.weight" in model.load_report.missing
    assert "blocks.5.mlp.fc1.weight" in caplog.text


def test_wrong_shape_checkpoint_is_a_clear_error(tmp_path):
    wide = timm_reference(embed_dim=96, num_heads=2)
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight: file \(288, 96\) vs model \(192, 64\)"):
        timm.create_model("vit_gne_tiny_patch14_siglip", pretrained_path=str(path))


def test_pos_embed_grid_is_resampled_at_load(tmp_path):
    other = timm_reference(img_size=168)  # a 12x12 pos-embed grid; the tiny preset has 16x16
    path = tmp_path / "small_grid.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    model = timm.create_model("vit_gne_tiny_patch14_siglip", pretrained_path=str(path))
    assert model.pos_embed.shape == (1, 256, 64)
    assert any("12x12 -> 16x16" in r for r in model.load_report.resampled)


def test_untrusted_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.bin"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        read_state_dict(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights format"):
        read_state_dict(bad)


def test_one_reader_for_shards_checks_every_tensor_once(tmp_path):
    from llava_uhd.errors import ReleaseError
    from llava_uhd.release import read_state
    from llava_uhd.vision.weights import read_weights

    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3)}
    save_file(a, str(tmp_path / "part-1.safetensors"))
    save_file(b, str(tmp_path / "part-2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}))
    for state in (read_weights(tmp_path), read_weights(index), read_state(tmp_path)):
        assert sorted(state) == ["x", "y"] and torch.equal(state["y"], b["y"])
    index.write_text(json.dumps({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors",
                                                "z": "part-2.safetensors"}}))
    with pytest.raises(ValueError, match="tensors listed but not in their shards: z"):
        read_weights(tmp_path)
    save_file({"x": torch.ones(2), "y": torch.ones(3)}, str(tmp_path / "part-2.safetensors"))
    index.write_text(json.dumps({"weight_map": {"x": "part-1.safetensors", "y": "part-2.safetensors"}}))
    with pytest.raises(ReleaseError, match=r"part-2.safetensors: tensors also in another shard: x"):
        read_state(tmp_path)
    index.write_text("{oops")
    with pytest.raises(ReleaseError, match=r"cannot read .*index.json: not a readable JSON index"):
        read_state(tmp_path)


def test_pickles_are_read_weights_only_or_refused_where_only_safetensors_are_allowed(tmp_path, reference):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"module": {k: v.contiguous() for k, v in reference.state_dict().items()}}}, path)
    state = read_state_dict(path)  # wrappers (Lightning / DDP style) unwrapped
    assert torch.equal(state["pos_embed"], reference.pos_embed)
    with pytest.raises(ValueError, match="pytorch_model.bin: pickled weights are never loaded"):
        read_state_dict(path, pickles=False)
    from llava_uhd.errors import ReleaseError
    from llava_uhd.release import read_state

    with pytest.raises(ReleaseError, match="no model weights in folder .*pickled weights are never loaded"):
        read_state(tmp_path)
