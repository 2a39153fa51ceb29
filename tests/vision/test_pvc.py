"""RPE and WTC: window-major order, the three poolings, the zero-init contract, the FlexiViT property."""

import math

import pytest
import torch
import torch.nn.functional as F

from llava_uhd.vision.pvc import (
    POOLING_KINDS,
    WindowedTokenCompression,
    average_pool_windows,
    naive_resize_patch_embed,
    refine_patch_embed,
    window_major_order,
)


@pytest.mark.parametrize("height,width,levels", [(4, 6, 1), (8, 4, 2), (8, 16, 3), (6, 10, 0)])
def test_window_major_order_groups_windows_and_ends_row_major(height, width, levels):
    order = window_major_order(height, width, levels)
    assert sorted(order.tolist()) == list(range(height * width))
    i = torch.arange(height).repeat_interleave(width)[order]
    j = torch.arange(width).repeat(height)[order]
    for _ in range(levels):
        # Each consecutive quadruple shares one coarser cell and covers its 2x2 children.
        ci, cj = (i >> 1).view(-1, 4), (j >> 1).view(-1, 4)
        assert (ci == ci[:, :1]).all() and (cj == cj[:, :1]).all()
        assert ((i & 1) * 2 + (j & 1)).view(-1, 4).sort(dim=1).values.eq(torch.arange(4)).all()
        i, j = ci[:, 0], cj[:, 0]
    final_w = width >> levels
    assert (i * final_w + j).tolist() == list(range((height >> levels) * final_w))


def test_window_major_order_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="divisible by 4"):
        window_major_order(6, 8, 2)


@pytest.mark.parametrize("pooling", POOLING_KINDS)
def test_every_pooling_quarters_the_tokens(pooling):
    wtc = WindowedTokenCompression(32, pooling)
    dense = wtc(torch.randn(3, 24, 32))
    packed = wtc(torch.randn(40, 32))
    assert dense.shape == (3, 6, 32) and packed.shape == (10, 32)
    assert torch.isfinite(dense).all()


def test_unknown_pooling_is_rejected():
    with pytest.raises(ValueError, match="unknown WTC pooling 'max'"):
        WindowedTokenCompression(8, "max")


def test_avg_is_the_window_mean():
    x = torch.randn(2, 16, 8)
    expected = x.view(2, 4, 4, 8).mean(dim=2)
    torch.testing.assert_close(WindowedTokenCompression(8, "avg")(x), expected)


def test_content_adaptive_starts_as_exact_average_pooling():
    torch.manual_seed(0)
    wtc = WindowedTokenCompression(48, "content_adaptive")
    x = torch.randn(5, 64, 48)
    assert torch.equal(wtc(x), average_pool_windows(x))
    assert torch.equal(wtc(x), WindowedTokenCompression(48, "avg")(x))
    assert wtc.fc1.weight.abs().sum() > 0, "W1 must keep a random init or the gate never gets a gradient"


def _gate_grad(wtc: WindowedTokenCompression) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 32, wtc.dim)
    target = torch.randn(2, 8, wtc.dim)
    F.mse_loss(wtc(x), target).backward()
    return wtc.fc2.weight.grad


def test_content_adaptive_gate_has_gradient_on_first_backward():
    wtc = WindowedTokenCompression(16, "content_adaptive")
    assert _gate_grad(wtc).abs().max() > 0


def test_all_zero_init_kills_the_gate_gradient():
    # The failure mode of zeroing W1 as well: hidden = GELU(0) = 0, so the gate never learns.
    wtc = WindowedTokenCompression(16, "content_adaptive")
    torch.nn.init.zeros_(wtc.fc1.weight)
    assert _gate_grad(wtc).abs().max() == 0


def test_content_adaptive_leaves_average_pooling_after_one_step():
    torch.manual_seed(2)
    wtc = WindowedTokenCompression(16, "content_adaptive")
    x = torch.randn(4, 32, 16)
    optimizer = torch.optim.SGD(wtc.parameters(), lr=1.0)
    F.mse_loss(wtc(x), torch.randn(4, 8, 16)).backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(wtc(x), average_pool_windows(x), atol=1e-6)
        weights = wtc.gate_weights(wtc.windows(x))
    torch.testing.assert_close(weights.sum(dim=-2), torch.ones(4, 8, 16))


def test_pixel_unshuffle_concatenates_window_in_order():
    wtc = WindowedTokenCompression(4, "pixel_unshuffle")
    assert wtc.norm.normalized_shape == (16,) and wtc.fc1.in_features == 16 and wtc.fc2.out_features == 4
    x = torch.randn(1, 8, 4)
    captured = {}
    wtc.norm.register_forward_hook(lambda m, inp, out: captured.setdefault("in", inp[0]))
    wtc(x)
    torch.testing.assert_close(captured["in"], x.view(1, 2, 16))


def natural_image(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth, photo-like test image: low-pass noise, soft blobs and a few edges; values in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, size // 8, size // 8, generator=g)
    image = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False) * 0.5
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for _ in range(6):
        cy, cx, r = torch.rand(3, generator=g)
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
        image = image + colour * blob
    image = image + 0.3 * (xx > 0.6).float() - 0.3 * (yy > 0.3).float() * (xx < 0.2).float()
    return image.clamp(-1, 1)


def test_rpe_pseudo_inverse_beats_naive_kernel_interpolation(capsys):
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 14, 14) * 0.02
    image = natural_image(280)
    small = F.interpolate(image, size=(200, 200), mode="bicubic", antialias=True, align_corners=False)
    reference = F.conv2d(image, weight, stride=14)
    pinv = F.conv2d(small, refine_patch_embed(weight, 10), stride=10)
    naive = F.conv2d(small, naive_resize_patch_embed(weight, 10), stride=10)
    err_pinv = ((pinv - reference).norm() / reference.norm()).item()
    err_naive = ((naive - reference).norm() / reference.norm()).item()
    with capsys.disabled():
        print(f"\nRPE 14->10 relative token error: PI-resize {err_pinv:.4f}, naive interpolation {err_naive:.4f}")
    assert math.isfinite(err_pinv) and err_pinv < err_naive


def test_refine_patch_embed_is_identity_at_same_size_and_keeps_dtype():
    weight = torch.randn(8, 3, 14, 14, dtype=torch.bfloat16)
    assert refine_patch_embed(weight, 14) is weight
    refined = refine_patch_embed(weight, 10)
    assert refined.shape == (8, 3, 10, 10) and refined.dtype == torch.bfloat16
