"""``load_encoder`` on folders the tests write in the release layouts: a Kimi-VL MoonViT folder (patch 14), a
released ViT-UHD folder (patch 10, ``merger`` keys, m_pooling / avg_pooling, sharded), SigLIP files; the
architecture comes from the checkpoint, every tensor is accounted for, and bad input is one clear error."""

import json
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.vision import encoder_from_state_dict, load_encoder
from llava_uhd.vision.pvc import refine_patch_embed

from ..helpers.vit import hf_layout, timm_reference

_RENAMES = {
    "norm1.": "norm0.",
    "norm2.": "norm1.",
    "attn.qkv.": "wqkv.",
    "attn.proj.": "wo.",
    "mlp.fc1.": "mlp.fc0.",
    "mlp.fc2.": "mlp.fc1.",
}


def moonvit_layout(model) -> dict[str, torch.Tensor]:
    """The model's weights under MoonViT / release names, with the release's unused ``zero_init_fc``."""
    out = {}
    g, c = model.cfg.pos_embed_grid, model.cfg.embed_dim
    for key, value in model.state_dict().items():
        value = value.clone().contiguous()
        if key.startswith("patch_embed.proj."):
            out[key] = value
        elif key == "pos_embed":
            out["patch_embed.pos_emb.weight"] = value.reshape(g, g, c)
        elif key.startswith("norm."):
            out["encoder.final_layernorm." + key[5:]] = value
        elif key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            old = next(o for o in _RENAMES if rest.startswith(o))
            out[f"encoder.blocks.{n}.{_RENAMES[old]}{rest[len(old):]}"] = value
        elif key.startswith("wtc."):
            _, k, rest = key.split(".", 2)
            rest = rest.replace("fc1.", "attn_layer.0.").replace("fc2.", "attn_layer.2.")
            out[f"encoder.blocks.{int(k) - 1}.merger.{rest}"] = value
        else:
            raise AssertionError(f"unmapped {key}")
    for k in model.cfg.wtc_layers:
        out[f"encoder.blocks.{k - 1}.merger.zero_init_fc.weight"] = torch.randn(c, c)
    return out


def moonvit_config(model, **extra) -> dict:
    cfg = model.cfg
    config = {
        "model_type": "moonvit",
        "patch_size": cfg.base_patch_size,
        "init_pos_emb_height": cfg.pos_embed_grid,
        "init_pos_emb_width": cfg.pos_embed_grid,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden,
    }
    if cfg.wtc_layers:
        config["merger_layer_index"] = [k - 1 for k in cfg.wtc_layers]
        config["merging_method"] = {"avg": "avg_pooling", "content_adaptive": "m_pooling"}[cfg.wtc_pooling]
    return {**config, **extra}


def hand_model(name: str, **overrides):
    """A model built by hand with non-trivial weights everywhere (norms, biases, live WTC gates)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pos_embed_init="random", **overrides).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.add_(torch.randn_like(p) * 0.1)
            if key.startswith("wtc.") and "fc2" in key:
                p.normal_(0, 0.5)
            if key == "pos_embed":
                p.normal_(0, 0.5)
    return model


def write_folder(folder, state, config=None, shards: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return folder
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same_tokens(a, b, sizes=((112, 84), (56, 168))):
    images = [torch.randn(3, h, w) for h, w in sizes]
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images).tokens, b.eval()(images).tokens, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a(images[0][None]).tokens, b(images[0][None]).tokens, atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def moonvit_folder(tmp_path_factory):
    model = hand_model("vit_gne_tiny_patch14_moonvit")
    folder = write_folder(tmp_path_factory.mktemp("moonvit"), moonvit_layout(model), moonvit_config(model))
    return model, folder


def test_moonvit_folder_builds_moonvit_and_accounts_for_every_tensor(moonvit_folder, caplog):
    hand, folder = moonvit_folder
    with caplog.at_level(logging.INFO, logger="llava_uhd.vision.weights"):
        model = load_encoder(folder)
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (64, 6, 2, 256)
    assert (cfg.base_patch_size, cfg.patch_size, cfg.pos_embed_grid, cfg.wtc_layers) == (14, 14, 16, ())
    assert (cfg.rope, cfg.norm_eps, cfg.pos_embed_antialias, cfg.act_layer) == ("2d", 1e-5, False, "gelu_tanh")
    report = model.load_report
    assert report.format == "moonvit"
    assert report.missing == report.unexpected == report.dropped == report.new_modules == report.resampled == []
    assert "moonvit layout" in caplog.text
    assert_same_tokens(model, hand)
    # the saved config can name and rebuild it
    assert model.registry_name == "vit_gne_tiny_patch14_moonvit"
    rebuilt = timm.create_model(model.registry_name, **json.loads(json.dumps(cfg.to_dict())))
    assert rebuilt.cfg == cfg


@pytest.mark.parametrize(
    "method, shards", [("m_pooling", 1), ("avg_pooling", 1), ("m_pooling", 3)], ids=["m_pooling", "avg", "sharded"]
)
def test_release_folder_takes_its_wtc_from_the_merger_keys(tmp_path, method, shards):
    pooling = {"m_pooling": "content_adaptive", "avg_pooling": "avg"}[method]
    hand = hand_model("vit_uhd_tiny_patch10_moonvit", wtc_layers=(2, 5), wtc_pooling=pooling)
    config = moonvit_config(hand, patch_size=10)
    if shards > 1:  # a config that disagrees: the checkpoint's own merger keys win
        config.update(merger_layer_index=[0, 2], merging_method="avg_pooling")
    folder = write_folder(tmp_path / "release", moonvit_layout(hand), config, shards)
    model = load_encoder(folder)
    assert (model.cfg.wtc_layers, model.cfg.wtc_pooling) == ((2, 5), pooling)
    assert (model.cfg.patch_size, model.reduction) == (10, 40)
    report = model.load_report
    assert report.missing == report.unexpected == report.new_modules == report.resampled == []
    assert report.dropped == [f"encoder.blocks.{i}.merger.zero_init_fc.weight" for i in (1, 4)]
    assert_same_tokens(model, hand, sizes=((80, 120), (40, 160)))
    assert model.registry_name == "vit_uhd_tiny_patch10_moonvit"
    # timm's entry with pretrained_path reads the same folder; its default WTC (2, 4) yields to the keys
    via_timm = timm.create_model("vit_uhd_tiny_patch10_moonvit", pretrained_path=str(folder))
    assert (via_timm.cfg.wtc_layers, via_timm.cfg.wtc_pooling) == ((2, 5), pooling)
    assert_same_tokens(via_timm, hand, sizes=((80, 120),))


def test_moonvit_folder_plus_patch_10_and_wtc_gives_rpe_and_fresh_wtcs(moonvit_folder):
    hand, folder = moonvit_folder
    model = load_encoder(folder, patch_size=10, wtc_layers=(2, 4))
    kernel = hand.patch_embed.proj.weight.detach()
    torch.testing.assert_close(model.patch_embed.proj.weight.detach(), refine_patch_embed(kernel, 10))
    report = model.load_report
    assert any("14 -> 10" in r for r in report.resampled)
    assert report.missing == report.unexpected == []
    assert {k.split(".")[1] for k in report.new_modules} == {"2", "4"}
    assert model.cfg.wtc_pooling == "content_adaptive"
    # fresh gates start as exact average pooling
    assert all(float(w.fc2.weight.detach().abs().sum()) == 0 for w in model.wtc.values())
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, hand.blocks[3].attn.qkv.weight)
    # the registry entry with pretrained_path does the same (no merger keys: its own WTC blocks 2 and 4)
    via_timm = timm.create_model("vit_uhd_tiny_patch10_moonvit", pretrained_path=str(folder))
    assert via_timm.cfg.wtc_layers == (2, 4)
    for key, value in model.state_dict().items():
        if not key.startswith("wtc."):
            torch.testing.assert_close(via_timm.state_dict()[key], value)


def test_pos_table_is_resampled_without_antialias_on_the_moonvit_path(moonvit_folder):
    hand, folder = moonvit_folder
    model = load_encoder(folder, pos_embed_grid=8)
    table = hand.pos_embed.detach().reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(model.pos_embed.detach(), expected.permute(0, 2, 3, 1).reshape(1, 64, 64))
    assert any("16x16 -> 8x8" in r for r in model.load_report.resampled)


def test_state_dict_in_memory_equals_the_folder(moonvit_folder):
    hand, folder = moonvit_folder
    state = moonvit_layout(hand)
    model = encoder_from_state_dict(state, moonvit_config(hand))
    assert_same_tokens(model, hand, sizes=((56, 56),))
    # without a config the heads cannot be known: a clear error, and an override fixes it
    with pytest.raises(ValueError, match="num_heads"):
        encoder_from_state_dict(state)
    assert encoder_from_state_dict(state, num_heads=2).cfg == model.cfg
    with pytest.raises(ValueError, match="hidden_size=96 but the weights have embed_dim 64"):
        encoder_from_state_dict(state, moonvit_config(hand, hidden_size=96))
    with pytest.raises(TypeError, match="unknown encoder option"):
        encoder_from_state_dict(state, num_heads=2, patch=10)


def test_siglip_files_still_load_with_their_architecture_read_off(tmp_path):
    ref = timm_reference()
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = load_encoder(path, num_heads=2)
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.mlp_hidden, cfg.patch_size, cfg.rope, cfg.wtc_layers) == (
        64, 6, 256, 14, "none", ()
    )
    assert model.load_report.format == "timm" and model.load_report.missing == []
    image = torch.randn(1, 3, 84, 112)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image).tokens, ref.forward_features(image), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_heads"):
        load_encoder(path)


def test_bad_inputs_give_one_clear_error_each(tmp_path, moonvit_folder):
    hand, folder = moonvit_folder
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere"):
        load_encoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not found: .*nowhere"):
        timm.create_model("vit_uhd_tiny_patch10_moonvit", pretrained_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="pretrained_path is empty"):
        timm.create_model("vit_uhd_tiny_patch10_moonvit", pretrained_path="")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(moonvit_config(hand)))
    with pytest.raises(FileNotFoundError, match="no encoder weights in folder .*empty"):
        load_encoder(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read weights file .*model.safetensors"):
        load_encoder(corrupt)
    (corrupt / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        load_encoder(corrupt)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"weight": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="(?i)cannot read weights file .*weights only"):
        load_encoder(pickled, num_heads=2)
    state = moonvit_layout(hand)
    state["encoder.blocks.3.wqkv.weight"] = state["encoder.blocks.3.wqkv.weight"][:, :32].contiguous()
    wrong = write_folder(tmp_path / "wrong", state, moonvit_config(hand))
    with pytest.raises(ValueError, match=r"blocks\.3\.attn\.qkv\.weight: file \(192, 32\) vs model \(192, 64\)"):
        load_encoder(wrong)
    sharded = write_folder(tmp_path / "sharded", moonvit_layout(hand), moonvit_config(hand), shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_encoder(sharded)


def test_hf_siglip_folder_takes_heads_and_eps_from_its_nested_vision_config(tmp_path):
    ref = timm_reference()
    state = hf_layout({k: v.contiguous() for k, v in ref.state_dict().items()})
    config = {"model_type": "siglip", "vision_config": {"hidden_size": 64, "num_attention_heads": 2,
                                                        "num_hidden_layers": 6, "layer_norm_eps": 1e-6}}
    folder = write_folder(tmp_path / "hf", state, config)
    model = load_encoder(folder)
    assert (model.cfg.num_heads, model.cfg.norm_eps, model.load_report.format) == (2, 1e-6, "hf_siglip")
    assert model.registry_name == "vit_gne_tiny_patch14_siglip"
    image = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image).tokens, ref.forward_features(image), atol=1e-5, rtol=0)
