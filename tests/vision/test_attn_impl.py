"""Packed attention kernels: the dispatcher's choice, the block-diagonal baseline as oracle on CPU, and (where a
GPU is present) PyTorch's varlen kernel against per-image SDPA and the dense path, RoPE on, forward and backward."""

from __future__ import annotations

import pytest
import timm
import torch

from llava_uhd.vision import attention, vit_uhd
from llava_uhd.vision.attention import (
    ATTN_IMPLS,
    block_diagonal_mask,
    packed_attention,
    resolve_attn_impl,
    varlen_unsupported,
)
from llava_uhd.vision.vit_uhd import ViTUHDConfig

SIZES = [(80, 80), (40, 120), (120, 40), (80, 80)]  # mixed lengths, one repeated (batched per-image SDPA)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(rope: bool = True, **kwargs) -> vit_uhd.ViTUHD:
    torch.manual_seed(0)
    name = "vit_uhd_tiny_patch10_moonvit" if rope else "vit_uhd_tiny_patch10_siglip"
    return timm.create_model(name, **kwargs)


def images(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(3, h, w, device=device, dtype=dtype) for h, w in SIZES]


def grads_of(model: torch.nn.Module, pixels: list[torch.Tensor], impl: str) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    model.attn_impl = impl
    pixels = [p.detach().clone().requires_grad_(True) for p in pixels]
    out = model(pixels).tokens
    (out.float().square().mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["pixels.0"] = pixels[0].grad.detach().clone()
    return out.detach(), grads


# -- dispatcher ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_auto_picks_per_image_sdpa_on_cpu(dtype):
    q = torch.randn(10, 2, 32, dtype=dtype)
    assert resolve_attn_impl("auto", q) == "sdpa"
    assert "CUDA" in varlen_unsupported(q)


def test_auto_picks_sdpa_for_fp32_and_for_dropout_even_on_cuda():
    # an object answering like a CUDA tensor, so the dtype / head_dim / dropout rules are checked without a GPU
    cuda_like = type("CudaLike", (), {"is_cuda": True, "dtype": torch.float32, "shape": (10, 2, 32),
                                      "device": torch.device("cuda")})()
    assert "float16 or bfloat16" in varlen_unsupported(cuda_like)
    assert resolve_attn_impl("auto", cuda_like) == "sdpa"
    cuda_like.dtype = torch.bfloat16
    assert "dropout" in varlen_unsupported(cuda_like, dropout_p=0.1)
    cuda_like.shape = (10, 2, 36)
    assert "multiple of 8" in varlen_unsupported(cuda_like)


def test_explicit_varlen_where_it_cannot_run_is_one_clear_error():
    with pytest.raises(ValueError, match="attn_impl='varlen'.*CUDA.*'auto' or 'sdpa'"):
        resolve_attn_impl("varlen", torch.randn(4, 2, 32))
    model = tiny()
    model.attn_impl = "varlen"
    with torch.no_grad(), pytest.raises(ValueError, match="attn_impl='varlen'"):
        model(images()[:2])


def test_attn_impl_is_validated_in_config_and_at_run_time():
    with pytest.raises(ValueError, match="attn_impl: unknown 'flash'"):
        ViTUHDConfig(attn_impl="flash")
    model = tiny(attn_impl="sdpa")
    assert model.attn_impl == "sdpa" and model.cfg.to_dict()["attn_impl"] == "sdpa"
    with pytest.raises(ValueError, match="attn_impl: unknown 'varlen2'"):
        model.attn_impl = "varlen2"
    assert model.attn_impl == "sdpa"
    assert set(ATTN_IMPLS) == {"auto", "varlen", "sdpa", "block_diagonal"}


def test_block_diagonal_mask_blocks_images_apart():
    mask = block_diagonal_mask([2, 3])
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = True
    expected[2:, 2:] = True
    assert torch.equal(mask, expected)


def test_each_kernel_is_what_runs(monkeypatch):
    """The kernel named is the one called: block_diagonal builds the pack-wide mask, sdpa never does."""
    calls = []
    real = attention.block_diagonal_mask
    monkeypatch.setattr(attention, "block_diagonal_mask", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = tiny().eval()
    with torch.no_grad():
        model.attn_impl = "sdpa"
        model(images())
        assert calls == []
        model.attn_impl = "block_diagonal"
        model(images())
    assert len(calls) == model.cfg.depth


# -- block-diagonal oracle on CPU ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [True, False])
def test_block_diagonal_equals_packed_forward_and_backward(rope):
    model = tiny(rope=rope).train()
    out, grads = grads_of(model, images(), "sdpa")
    ref_out, ref_grads = grads_of(model, images(), "block_diagonal")
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and "blocks.0.attn.qkv.weight" in grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_packed_attention_kernels_agree_on_one_layer():
    attn = tiny().blocks[0].attn.eval()
    x = torch.randn(16 + 4 + 16, 64)
    lengths = [16, 4, 16]
    with torch.no_grad():
        a = packed_attention(attn, x, lengths, impl="sdpa")
        b = packed_attention(attn, x, lengths, impl="block_diagonal")
        alone = packed_attention(attn, x[16:20], [4], impl="sdpa")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[16:20], alone, atol=1e-5, rtol=1e-5)  # no leak across images


# -- GPU: varlen --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_equals_per_image_sdpa_with_rope_forward_and_backward(dtype):
    model = tiny(rope=True).to("cuda", dtype).train()
    pixels = images("cuda", dtype)
    q = torch.empty(4, 2, model.cfg.head_dim, device="cuda", dtype=dtype)
    assert resolve_attn_impl("auto", q) == "varlen"
    out, grads = grads_of(model, pixels, "varlen")
    ref_out, ref_grads = grads_of(model, pixels, "sdpa")
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for name, grad in ref_grads.items():
        scale = grad.float().abs().max().clamp_min(1e-6)
        err = (grads[name].float() - grad.float()).abs().max() / scale
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.gpu
@CUDA
def test_dense_equals_packed_varlen_with_rope_forward_and_backward():
    """Same-size images: the dense [B, N, C] path (timm's SDPA) and the packed varlen path agree."""
    model = tiny(rope=True).to("cuda", torch.bfloat16).train()
    torch.manual_seed(2)
    batch = torch.randn(3, 3, 80, 120, device="cuda", dtype=torch.bfloat16)
    model.zero_grad()
    dense = model(batch).tokens
    dense.float().square().mean().backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    packed, packed_grads = grads_of(model, list(batch), "varlen")
    torch.testing.assert_close(packed.view_as(dense), dense.detach(), atol=2e-2, rtol=2e-2)
    for name, grad in dense_grads.items():
        scale = grad.float().abs().max().clamp_min(1e-6)
        err = (packed_grads[name].float() - grad.float()).abs().max() / scale
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"
