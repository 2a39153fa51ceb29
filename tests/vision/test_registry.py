"""The timm registry entries: pretrained configs timm's data helpers read, and the checkpoint filter under timm's
own loader."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import load_checkpoint

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.vision.weights import checkpoint_filter_fn

from ..helpers.vit import timm_reference


def test_pretrained_cfg_is_timms_and_follows_the_pixel_norm():
    model = timm.create_model("vit_uhd_tiny_patch10_moonvit")
    assert model.pretrained_cfg["architecture"] == "vit_uhd_tiny_patch10_moonvit"
    data = resolve_data_config(model=model)
    assert (data["mean"], data["std"], data["interpolation"]) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    other = timm.create_model("vit_gne_tiny_patch14_siglip", mean=(0.4, 0.4, 0.4), std=(0.2, 0.3, 0.2))
    assert resolve_data_config(model=other)["std"] == (0.2, 0.3, 0.2)
    # a classifier's factory options are accepted and ignored (an encoder has no head); anything else is an error
    assert timm.create_model("vit_gne_tiny_patch14_siglip", num_classes=10, global_pool="avg").num_classes == 0
    with pytest.raises(TypeError, match=r"unknown ViT-UHD option\(s\) \['in_chans'\]"):
        timm.create_model("vit_gne_tiny_patch14_siglip", in_chans=1)


def test_checkpoint_filter_under_timms_load_checkpoint_equals_pretrained_path(tmp_path):
    ref = timm_reference()
    path = tmp_path / "open_clip.safetensors"
    save_file({"visual.trunk." + k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    loaded = timm.create_model("vit_uhd_tiny_patch10_siglip", pretrained_path=str(path))
    torch.manual_seed(1)
    model = timm.create_model("vit_uhd_tiny_patch10_siglip")
    result = load_checkpoint(model, str(path), filter_fn=checkpoint_filter_fn, strict=False)
    assert sorted(result.missing_keys) == loaded.load_report.new_modules  # only the fresh WTC gates
    assert result.unexpected_keys == []  # the MAP head is filtered out, not left for load_state_dict to refuse
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("wtc.")}
    for key, value in ours.items():
        torch.testing.assert_close(value, loaded.state_dict()[key], atol=0, rtol=0, msg=key)
    assert model.patch_embed.proj.weight.shape[-1] == 10  # PI-resized 14 -> 10 by the filter
