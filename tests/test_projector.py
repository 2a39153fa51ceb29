import pytest
import torch

from llava_uhd.projector import MLPProjector, PatchMergerProjector, build_projector


def test_mlp_keeps_one_token_per_encoder_token_dense_or_packed():
    torch.manual_seed(0)
    proj = build_projector("mlp", 16, 24)
    assert isinstance(proj, MLPProjector) and proj.merge == 1
    dense = torch.randn(2, 6, 16)
    out = proj(dense, [(2, 3), (2, 3)])
    assert out.shape == (12, 24)
    torch.testing.assert_close(out, proj(dense.reshape(12, 16), [(2, 3), (2, 3)]))


def test_merger_concatenates_each_2x2_window_in_row_major_order():
    proj = PatchMergerProjector(1, 5)
    # Token value = its row-major index; the windows must hold (r, c), (r, c+1), (r+1, c), (r+1, c+1).
    grid = (4, 6)
    tokens = torch.arange(24, dtype=torch.float32)[:, None]
    windows = proj._windows(tokens, [grid])
    expected = [[r * 6 + c, r * 6 + c + 1, (r + 1) * 6 + c, (r + 1) * 6 + c + 1] for r in (0, 2) for c in (0, 2, 4)]
    assert windows.squeeze(-1).tolist() == expected


def test_merger_packed_mixed_grids_equal_per_image():
    torch.manual_seed(0)
    proj = build_projector("merger", 8, 12)
    assert proj.merge == 2
    a, b = torch.randn(4 * 6, 8), torch.randn(2 * 2, 8)
    packed = proj(torch.cat([a, b]), [(4, 6), (2, 2)])
    assert packed.shape == (6 + 1, 12)
    torch.testing.assert_close(packed, torch.cat([proj(a, [(4, 6)]), proj(b, [(2, 2)])]))
    # The same-grid fast path (one batched view) agrees with the per-image path.
    dense = torch.randn(3, 4 * 6, 8)
    torch.testing.assert_close(proj(dense, [(4, 6)] * 3), torch.cat([proj(x, [(4, 6)]) for x in dense]))


def test_projector_errors():
    with pytest.raises(ValueError, match="even token grid"):
        build_projector("merger", 8, 8)(torch.randn(6, 8), [(2, 3)])
    with pytest.raises(ValueError, match="grids"):
        build_projector("mlp", 8, 8)(torch.randn(5, 8), [(2, 3)])
    with pytest.raises(ValueError, match="unknown projector"):
        build_projector("resampler", 8, 8)
