import pickle

import pytest
import timm
import torch

from llava_uhd.projector import build_projector
from llava_uhd.vision.slicing import SliceEncoder, SliceGridPolicy, views_per_image


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((300, 300), (1, 1)),  # fits one slice: no slicing, no thumbnail
        ((672, 672), (2, 2)),
        ((1008, 1008), (3, 3)),
        ((4000, 4000), (3, 3)),  # capped at max_slices
        ((336, 1344), (1, 4)),  # wide: one row
        ((1344, 336), (4, 1)),
        ((700, 1000), (2, 3)),
    ],
)
def test_grid_follows_area_and_aspect(size, grid):
    policy = SliceGridPolicy(slice_size=336, max_slices=9)
    assert policy.grid(*size) == grid
    assert policy.target_size(*size) == (grid[0] * 336, grid[1] * 336)


def test_grid_never_exceeds_max_slices():
    policy = SliceGridPolicy(slice_size=50, max_slices=6)
    for h in range(20, 600, 37):
        for w in range(20, 600, 53):
            rows, cols = policy.grid(h, w)
            assert 1 <= rows * cols <= 6


@pytest.fixture(scope="module")
def sbe():
    torch.manual_seed(0)
    return timm.create_model("vit_sbe_tiny_patch14_siglip", slice_size=28, max_slices=6).eval()


def test_views_are_thumbnail_then_slices(sbe):
    image = torch.randn(3, 56, 84)
    views, layout = sbe.views(image)
    assert layout == (2, 3) and views.shape == (7, 3, 28, 28)
    for k in range(6):
        r, c = divmod(k, 3)
        torch.testing.assert_close(views[1 + k], image[:, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28])
    single, layout = sbe.views(torch.randn(3, 28, 28))
    assert layout == (1, 1) and single.shape == (1, 3, 28, 28)


def test_forward_encodes_every_view_independently(sbe):
    images = [torch.randn(3, 56, 84), torch.randn(3, 28, 28)]
    out = sbe(images)
    assert out.layouts == [(2, 3), (1, 1)]
    assert out.tokens.shape == (8, 4, sbe.embed_dim) and out.grids == [(2, 2)] * 8
    alone = sbe.base(sbe.views(images[1])[0]).tokens
    torch.testing.assert_close(out.tokens[-1:], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="slices"):
        sbe([torch.randn(3, 30, 28)])


def test_join_interleaves_separators(sbe):
    layouts = [(2, 2), (1, 1)]
    t = 2
    index = SliceEncoder.join_index(layouts, t).tolist()
    sep, row = 6 * t, 6 * t + 1  # 5 + 1 views of t tokens, then slice_sep, row_sep
    first = [0, 1, row, 2, 3, sep, 4, 5, row, 6, 7, sep, 8, 9]
    assert index == first + [10, 11]
    views = torch.arange(6 * t, dtype=torch.float32)[:, None].expand(-1, 3)
    separators = torch.tensor([[-1.0] * 3, [-2.0] * 3])
    joined = sbe.join(views, layouts, separators)
    assert joined[:, 0].tolist() == [float(v) if v < sep else (-1.0 if v == sep else -2.0) for v in index]


@pytest.mark.parametrize("kind", ["mlp", "merger"])
def test_num_image_tokens_matches_the_joined_stream(sbe, kind):
    projector = build_projector(kind, sbe.embed_dim, 16)
    sizes = [(56, 84), (28, 28), (84, 28)]
    out = sbe([torch.randn(3, *s) for s in sizes])
    joined = sbe.join(projector(out.tokens, out.grids), out.layouts, torch.zeros(2, 16))
    per_view = 4 if kind == "mlp" else 1
    expected = [(r * c + 1) * per_view + r * c if r * c > 1 else per_view for r, c in out.layouts]
    assert [sbe.num_image_tokens(h, w, projector) for h, w in sizes] == expected
    assert joined.shape[0] == sum(expected)
    assert views_per_image(3, 1) == 4 and views_per_image(1, 1) == 1


@pytest.mark.parametrize("kind", ["mlp", "merger"])
def test_token_interface_is_the_slice_grid(sbe, kind):
    """The SBE answers the encoder interface: its policy is the slice grid whatever the area limits, and the
    picklable counter equals num_image_tokens; a size that is no slice grid is an error, not a floored count."""
    projector = build_projector(kind, sbe.embed_dim, 16)
    policy = sbe.policy(projector, min_pixels=10, max_pixels=20, max_side=30, name="release")
    assert policy == SliceGridPolicy(28, 6) == sbe.policy(projector)
    counter = pickle.loads(pickle.dumps(sbe.token_counter(projector)))
    for size in [(28, 28), (56, 84), (84, 28), (28, 168)]:
        out = sbe([torch.randn(3, *size)])
        joined = sbe.join(projector(out.tokens, out.grids), out.layouts, torch.zeros(2, 16))
        assert counter(*size) == sbe.num_image_tokens(*size, projector) == joined.shape[0]
    with pytest.raises(ValueError, match="not a grid of 28px slices"):
        sbe.num_image_tokens(30, 28, projector)
