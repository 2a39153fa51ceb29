"""Resolution policy and the shared preprocessing path."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.vision.resize import ResolutionPolicy, make_policy, preprocess, to_rgb, upright_size

SIZES = [(1024, 1024), (100, 100), (3000, 4000), (768, 1366), (480, 640), (1, 5000), (5000, 1), (9000, 300)]


@pytest.mark.parametrize("height,width", SIZES)
def test_target_size_respects_every_constraint(height, width):
    policy = ResolutionPolicy()
    h, w = policy.target_size(height, width)
    assert h % 40 == 0 and w % 40 == 0 and h > 0 and w > 0
    assert max(h, w) <= policy.max_side
    assert h * w <= policy.max_pixels
    if max(height, width) / min(height, width) < 50:  # reachable area: the bounds hold
        assert h * w >= policy.min_pixels
        # aspect ratio as close as one multiple step allows
        step = math.log((min(h, w) + 40) / min(h, w))
        assert abs(math.log(h / w) - math.log(height / width)) <= step


def test_within_bounds_images_stay_near_their_size():
    policy = ResolutionPolicy()
    assert policy.target_size(480, 640) == (480, 640)
    h, w = policy.target_size(1000, 700)
    assert abs(h - 1000) <= 40 and abs(w - 700) <= 40


def test_large_and_small_images_are_scaled_into_the_budget():
    policy = ResolutionPolicy(min_pixels=100 * 100, max_pixels=200 * 200, max_side=400, multiple=20)
    assert policy.target_size(10, 10) == (100, 100)
    assert policy.target_size(4000, 4000) == (200, 200)
    h, w = policy.target_size(10, 1000)
    assert w == 400 and h == 20  # longest side capped; min area unreachable at this aspect


def test_policy_validates_its_settings():
    with pytest.raises(ValueError):
        ResolutionPolicy(multiple=0)
    with pytest.raises(ValueError):
        ResolutionPolicy(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError):
        ResolutionPolicy().target_size(0, 10)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "CMYK", "P", "I;16", "I", "F", "1", "RGB"])
def test_every_colour_mode_becomes_rgb(mode):
    image = Image.new(mode, (30, 20))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)


def test_sixteen_bit_images_keep_their_dynamic_range():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(image)).min() == 255


def test_preprocess_normalises_and_resizes():
    policy = ResolutionPolicy(min_pixels=80 * 80, max_pixels=160 * 160, multiple=40)
    white = Image.new("RGB", (100, 50), (255, 255, 255))
    x = preprocess(white, policy)
    assert x.shape[0] == 3 and tuple(x.shape[1:]) == policy.target_size(50, 100)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5


def test_jpeg_and_png_paths_agree():
    rng = np.random.default_rng(0)
    array = (rng.random((32, 48, 3)) * 40 + np.linspace(0, 200, 48)[None, :, None]).astype(np.uint8)
    array = np.kron(array, np.ones((20, 20, 1), dtype=np.uint8))  # 640x960, smooth blocks
    policy = ResolutionPolicy(min_pixels=80 * 80, max_pixels=240 * 240, multiple=40)
    tensors = []
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, quality=95)
        buffer.seek(0)
        tensors.append(preprocess(Image.open(buffer), policy))
    assert tensors[0].shape == tensors[1].shape
    assert (tensors[0] - tensors[1]).abs().mean() < 0.05


@pytest.mark.parametrize("height, width", [(3000, 10), (10, 3000), (5000, 1)])
def test_strips_fit_a_small_area_budget(height, width):
    """A strip whose short side is one multiple already still gets a size within the budget (was: max() of nothing)."""
    policy = ResolutionPolicy(min_pixels=40 * 40, max_pixels=160 * 160, multiple=40)
    h, w = policy.target_size(height, width)
    assert h % 40 == 0 and w % 40 == 0 and h * w <= policy.max_pixels
    assert min(h, w) == 40 and max(h, w) == 160 * 160 // 40 // 40 * 40
    assert (h > w) == (height > width)


def _phone_photo(orientation: int) -> Image.Image:
    """A 1200x800 (w x h) upright scene, red on top and blue below, stored the way a camera held sideways stores it:
    pixels turned and an EXIF orientation tag saying how to turn them back."""
    scene = np.zeros((800, 1200, 3), dtype=np.uint8)
    scene[:400, :, 0] = 255
    scene[400:, :, 2] = 255
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    stored = Image.fromarray(scene).transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("policy_name", ["default", "release"])
def test_exif_rotated_photo_is_encoded_upright_and_sized_from_its_header(orientation, policy_name):
    policy = make_policy(policy_name, multiple=40)
    image = _phone_photo(orientation)
    assert upright_size(image) == (800, 1200)  # header only: nothing decoded yet
    pixels = preprocess(image, policy, normalized=False)
    assert tuple(pixels.shape[-2:]) == policy.target_size(800, 1200)
    h = pixels.shape[-2]
    top, bottom = pixels[:, : h // 3].float().mean((1, 2)), pixels[:, -h // 3 :].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 50, top  # red on top, as the photo is shown
    assert bottom[2] > 200 and bottom[0] < 50, bottom
