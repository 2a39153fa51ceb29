"""ViT-UHD: parity with timm, packed == per-image, geometry, pos-embed cache, registry."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.vision import ViTUHD, ViTUHDConfig
from llava_uhd.vision.report import policy_for

from ..helpers.vit import timm_reference


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    ref = timm_reference()
    path = tmp_path_factory.mktemp("weights") / "siglip_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def test_parity_with_timm_forward_features_dense_and_packed(reference_checkpoint):
    ref, path = reference_checkpoint
    ours = timm.create_model("vit_gne_tiny_patch14_siglip", pretrained_path=str(path)).eval()
    sizes = [(224, 224), (112, 196), (168, 56)]
    with torch.no_grad():
        images = [torch.randn(3, h, w) for h, w in sizes]
        expected = [ref.forward_features(img[None])[0] for img in images]
        for img, exp in zip(images, expected):
            torch.testing.assert_close(ours(img[None]).tokens[0], exp, atol=1e-5, rtol=0)
        packed = ours(images)
        torch.testing.assert_close(packed.tokens, torch.cat(expected), atol=1e-5, rtol=0)
        assert packed.grids == [(h // 14, w // 14) for h, w in sizes]


def randomise_gates(model: ViTUHD) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for wtc in model.wtc.values():
            wtc.fc2.weight.normal_(0, 0.5)


@pytest.mark.parametrize("pooling", ["content_adaptive", "pixel_unshuffle", "avg"])
def test_packed_equals_per_image(pooling):
    model = timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_pooling=pooling).eval()
    if pooling == "content_adaptive":
        randomise_gates(model)
    sizes = [(80, 120), (40, 40), (160, 80), (80, 120)]
    images = [torch.randn(3, h, w) for h, w in sizes]
    with torch.no_grad():
        packed = model(images)
        single = [model(img[None]).tokens[0] for img in images]
    torch.testing.assert_close(packed.tokens, torch.cat(single), atol=1e-5, rtol=1e-5)
    assert packed.grids == [(h // 40, w // 40) for h, w in sizes]
    assert packed.tokens.shape == (sum(h * w for h, w in packed.grids), 64)


def test_dense_batch_shape_and_grid():
    model = timm.create_model("vit_uhd_tiny_patch10_siglip").eval()
    out = model(torch.randn(3, 3, 120, 200))
    assert out.tokens.shape == (3, 15, 64) and out.grids == [(3, 5)] * 3


def test_output_is_row_major_on_the_final_grid():
    # With average pooling and no blocks in the way, output token (r, c) must be the mean of its 4x4 patch cell.
    model = timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_pooling="avg", wtc_layers=(6,), depth=6).eval()
    model.blocks = torch.nn.Sequential(*[torch.nn.Identity()] * 6)
    model.norm = torch.nn.Identity()
    with torch.no_grad():
        model.pos_embed.zero_()
        image = torch.randn(1, 3, 60, 100)
        out = model(image).tokens[0]
        patches = model.patch_embed.proj(image)[0]  # C, 6, 10
        expected = F.avg_pool2d(patches[None], 2)[0].flatten(1).T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_packed_attention_never_builds_a_pack_wide_mask(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((tuple(q.shape), attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = timm.create_model("vit_uhd_tiny_patch10_siglip").eval()
    with torch.no_grad():
        model([torch.randn(3, 80, 80), torch.randn(3, 40, 120), torch.randn(3, 80, 80)])
    assert seen and all(mask is None for _, mask in seen)
    # Attention spans one image's tokens at a time: 64 or 48 tokens in the first blocks, never the 176 of the pack.
    assert {shape[2] for shape, _ in seen} <= {64, 48, 16, 12, 4, 3}
    assert {shape[0] for shape, _ in seen if shape[2] == 64} == {2}  # equal-size images share one call


def test_size_not_a_multiple_names_the_required_multiple():
    model = timm.create_model("vit_uhd_tiny_patch10_siglip")
    with pytest.raises(ValueError, match="multiple of 40"):
        model(torch.randn(1, 3, 80, 90))
    with pytest.raises(ValueError, match="multiple of 40"):
        model([torch.randn(3, 80, 80), torch.randn(3, 50, 80)])
    gne = timm.create_model("vit_gne_tiny_patch14_siglip")
    with pytest.raises(ValueError, match="multiple of 14"):
        gne(torch.randn(1, 3, 80, 80))


def test_pos_embed_is_cached_per_grid_at_inference_and_trained_otherwise():
    model = timm.create_model("vit_uhd_tiny_patch10_siglip").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 80, 80))
        model(torch.randn(2, 3, 80, 80))
        model(torch.randn(1, 3, 40, 120))
    assert sorted(key[0] for key in model._pos_cache) == [(4, 12), (8, 8)]
    model.train()
    model(torch.randn(1, 3, 80, 80)).tokens.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_pos_embed_cache_is_invalidated_by_weight_updates():
    model = timm.create_model("vit_gne_tiny_patch14_siglip").eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model(x).tokens.clone()
        model.pos_embed.add_(1.0)
        after = model(x).tokens
    assert not torch.allclose(before, after)


def test_gradient_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    model = timm.create_model("vit_uhd_tiny_patch10_siglip").train()
    images = [torch.randn(3, 80, 80), torch.randn(3, 40, 80)]
    model(images).tokens.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).tokens.square().mean().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


def test_registry_names_and_overrides():
    names = timm.list_models("vit_uhd_*") + timm.list_models("vit_gne_*")
    for name in (
        "vit_uhd_so400m_patch10_siglip",
        "vit_gne_so400m_patch14_siglip",
        "vit_uhd_tiny_patch10_siglip",
        "vit_gne_tiny_patch14_siglip",
    ):
        assert name in names
    big = timm.create_model("vit_uhd_so400m_patch10_siglip", device="meta")
    assert (big.cfg.embed_dim, big.cfg.depth, big.cfg.num_heads, big.cfg.wtc_layers) == (1152, 27, 16, (4, 18))
    assert big.blocks[0].mlp.fc1.out_features == 4304 and big.blocks[0].attn.head_dim == 72
    model = timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_pooling="avg", wtc_layers=(3,), patch_size=12)
    assert model.reduction == 24 and model.patch_embed.proj.kernel_size == (12, 12)
    assert list(model.wtc) == ["3"] and model.wtc["3"].pooling == "avg"
    with pytest.raises(ValueError, match="wtc_pooling"):
        timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_pooling="max")
    with pytest.raises(ValueError, match="wtc_layers"):
        timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_layers=(2, 7))
    with pytest.raises(ValueError, match="pretrained_path"):
        timm.create_model("vit_uhd_tiny_patch10_siglip", pretrained=True)


@pytest.mark.parametrize("resolution", [512, 768, 1024, 1536, 2048])
def test_so400m_token_counts_follow_the_formula(resolution):
    uhd = timm.create_model("vit_uhd_so400m_patch10_siglip", device="meta").eval()
    gne = timm.create_model("vit_gne_so400m_patch14_siglip", device="meta").eval()
    for model, per_token in ((uhd, 40), (gne, 14)):
        height, width = policy_for(model).target_size(resolution, resolution)
        assert height % per_token == 0 and width % per_token == 0
        with torch.no_grad():
            tokens = model(torch.empty(1, 3, height, width, device="meta")).tokens
        # one output token per (patch * 2^steps)^2 pixels: 40x40 for ViT-UHD, 14x14 for GNE
        assert tokens.shape[1] == (height // per_token) * (width // per_token) == model.num_tokens(height, width)
    # ViT-UHD emits (10/14 * 4)^-2 ~ 1/7.8 as many tokens as GNE at the same request
    uhd_n = uhd.num_tokens(*policy_for(uhd).target_size(resolution, resolution))
    gne_n = gne.num_tokens(*policy_for(gne).target_size(resolution, resolution))
    assert 6.5 < gne_n / uhd_n < 9.5


def test_config_dataclass_derives_reduction():
    cfg = ViTUHDConfig(patch_size=8, wtc_layers=(1, 2, 3), depth=4, embed_dim=32, num_heads=2)
    assert cfg.reduction == 64
    assert "reduction" not in cfg.to_dict()


def test_from_scratch_pos_embed_starts_as_unit_scale_sincos_for_tiny_models():
    tiny = timm.create_model("vit_gne_tiny_patch14_siglip")
    assert tiny.cfg.pos_embed_init == "sincos"
    pos = tiny.pos_embed[0].detach().reshape(16, 16, -1)
    # unit-scale, not timm's std-0.02 noise that the patch features drown out
    assert pos.std() > 0.3
    # smooth in both directions: a neighbour is more alike than a far cell, along rows and along columns
    sim = torch.nn.functional.cosine_similarity
    assert sim(pos[5, 5], pos[5, 6], dim=0) > sim(pos[5, 5], pos[5, 15], dim=0) + 0.1
    assert sim(pos[5, 5], pos[6, 5], dim=0) > sim(pos[5, 5], pos[15, 5], dim=0) + 0.1
    assert tiny.pos_embed.requires_grad  # still learned
    random = timm.create_model("vit_gne_tiny_patch14_siglip", pos_embed_init="random")
    assert random.pos_embed.std() < 0.05
    # full-size models keep timm's init (their pos-embed comes from pretrained weights)
    assert timm.create_model("vit_uhd_so400m_patch10_siglip", device="meta").cfg.pos_embed_init == "random"
    with pytest.raises(ValueError, match="pos_embed_init"):
        timm.create_model("vit_uhd_tiny_patch10_siglip", pos_embed_init="zeros")


def test_moonvit_registry_entries_have_the_release_shape():
    uhd = timm.create_model("vit_uhd_so400m_patch10_moonvit", device="meta")
    cfg = uhd.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.base_patch_size) == (1152, 27, 16, 10, 14)
    assert (cfg.wtc_layers, cfg.wtc_pooling, cfg.rope) == ((4, 18), "content_adaptive", "2d")
    assert cfg.pos_embed_antialias is False and cfg.pos_embed_grid == 64
    assert uhd.blocks[0].mlp.fc1.out_features == 4304 and uhd.blocks[0].attn.head_dim == 72
    assert uhd.blocks[26].norm2.eps == uhd.norm.eps == 1e-5
    assert uhd.pos_embed.shape == (1, 64 * 64, 1152)
    # the release's 427,155,696 parameters, less the two never-used 1152x1152 merger.zero_init_fc
    assert sum(p.numel() for p in uhd.parameters()) == 427_155_696 - 2 * 1152 * 1152
    gne = timm.create_model("vit_gne_so400m_patch14_moonvit", device="meta")
    assert (gne.cfg.patch_size, gne.cfg.wtc_layers, gne.cfg.rope, gne.reduction) == (14, (), "2d", 14)
    tiny = timm.create_model("vit_uhd_tiny_patch10_moonvit")
    assert (tiny.cfg.embed_dim, tiny.cfg.num_heads, tiny.cfg.head_dim, tiny.cfg.depth) == (64, 2, 32, 6)
    assert timm.create_model("vit_uhd_so400m_patch10_siglip", device="meta").norm.eps == 1e-6  # SigLIP unchanged


@pytest.mark.parametrize("name", timm.list_models("vit_uhd_*") + timm.list_models("vit_gne_*"))
def test_registry_name_and_config_rebuild_the_same_architecture(name):
    model = timm.create_model(name, device="meta")
    assert model.registry_name == name
    rebuilt = timm.create_model(model.registry_name, device="meta", **model.cfg.to_dict())
    assert rebuilt.cfg == model.cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_mlp_dim_gives_the_exact_hidden_width():
    model = ViTUHD(ViTUHDConfig(embed_dim=1152, depth=1, num_heads=16, mlp_dim=4304, wtc_layers=()))
    assert model.blocks[0].mlp.fc1.out_features == 4304
    odd = ViTUHD(ViTUHDConfig(embed_dim=96, depth=1, num_heads=2, mlp_dim=331, wtc_layers=()))
    assert odd.blocks[0].mlp.fc1.out_features == 331


def test_pos_embed_resampling_antialias_is_a_config_option():
    on = timm.create_model("vit_gne_tiny_patch14_siglip").eval()
    off = timm.create_model("vit_gne_tiny_patch14_moonvit").eval()
    assert on.cfg.pos_embed_antialias and not off.cfg.pos_embed_antialias
    with torch.no_grad():
        off.pos_embed.copy_(on.pos_embed)
        table = on.pos_embed.reshape(1, 16, 16, 64).permute(0, 3, 1, 2)
        for model, antialias in ((on, True), (off, False)):
            expected = F.interpolate(table, size=(4, 4), mode="bicubic", align_corners=False, antialias=antialias)
            torch.testing.assert_close(model.pos_embed_for((4, 4)), expected[0].flatten(1).T)
        assert (on.pos_embed_for((4, 4)) - off.pos_embed_for((4, 4))).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["vit_uhd_tiny_patch10_siglip", "vit_uhd_tiny_patch10_moonvit"])
def test_encoding_under_inference_mode_leaves_caches_usable_for_training(name):
    """Lightning validates (and generation runs) under ``torch.inference_mode``; the caches filled there (token
    order, pos-embed of a frozen grid, RoPE tables) must not poison a later training step on the same grid."""
    model = timm.create_model(name)
    model.pos_embed.requires_grad_(False)  # frozen pos-embed: its resampled grid is cached too
    images = torch.randn(2, 3, 80, 120)
    with torch.inference_mode():
        model(images)
        model([images[0], images[1, :, :40]])
    model.train()
    dense = model(images).tokens
    packed = model([images[0], images[1, :, :40]]).tokens
    (dense.sum() + packed.sum()).backward()
    assert model.patch_embed.proj.weight.grad is not None


def test_a_repeated_wtc_index_compresses_after_that_block_as_a_4x4_mean():
    """wtc_layers (6, 6) on a 6-block ViT: nothing compressed inside it, the same 16x after its last block; with
    avg pooling that is the 4x4 mean of the uncompressed ViT's last tokens."""
    torch.manual_seed(0)
    after = timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_layers=(6, 6), wtc_pooling="avg").eval()
    plain = timm.create_model("vit_uhd_tiny_patch10_siglip", wtc_layers=()).eval()
    plain.load_state_dict(after.state_dict())
    assert list(after.wtc) == ["6", "6_2"] and after.reduction == 40
    kept = {}
    plain.norm.register_forward_hook(lambda m, args, out: kept.update(tokens=args[0]))
    image = torch.randn(1, 3, 160, 240)
    with torch.no_grad():
        out = after(image)
        plain(image)
        h, w = 16, 24
        grid = kept["tokens"][0].view(h, w, -1).permute(2, 0, 1)
        expected = plain.norm(F.avg_pool2d(grid[None], 4)[0].flatten(1).T)
    assert out.grids == [(4, 6)]
    torch.testing.assert_close(out.tokens[0], expected, atol=1e-5, rtol=1e-5)
    packed = after([image[0], torch.randn(3, 80, 120)])
    assert packed.grids == [(4, 6), (2, 3)]
    torch.testing.assert_close(packed.tokens[:24], out.tokens[0], atol=1e-5, rtol=1e-5)


def test_wtc_layers_must_not_decrease():
    with pytest.raises(ValueError, match=r"wtc_layers: must be increasing \(an index may repeat\), got \[4, 2\]"):
        ViTUHDConfig(depth=6, wtc_layers=(4, 2))
