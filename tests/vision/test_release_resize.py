"""The released model's resize rule (upscale 1.4, clamp, floor to 40, PIL bicubic) as the ``release`` policy."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_uhd.vision.resize import ReleaseResolutionPolicy, ResolutionPolicy, make_policy, normalize, preprocess

RELEASE = ReleaseResolutionPolicy()


@pytest.mark.parametrize("side,out,tokens", [(512, 680, 289), (768, 1040, 676), (1024, 1400, 1225)])
def test_square_inputs_give_the_release_token_counts(side, out, tokens):
    h, w = RELEASE.target_size(side, side)
    assert (h, w) == (out, out)
    assert (h // 40) * (w // 40) == tokens


def test_a_photo_becomes_880_by_560():
    assert RELEASE.target_size(427, 640) == (560, 880)  # (height, width)
    assert (560 // 40) * (880 // 40) == 308


@pytest.mark.parametrize("height,width", [(4000, 3000), (100, 100), (1, 9000), (9000, 1), (1600, 1600), (30, 700)])
def test_every_side_is_a_floored_multiple_within_the_caps(height, width):
    h, w = RELEASE.target_size(height, width)
    assert h % 40 == 0 and w % 40 == 0 and h >= 40 and w >= 40
    assert max(h, w) <= 5120
    assert h * w <= 1560 * 1560


def test_large_images_clamp_to_the_area_and_are_not_upscaled():
    # 4000x3000 > 1560^2: no 1.4; H = int(1560 / sqrt(4/3)) = 1351, W = int(1351 * 4/3) = 1801 -> floored.
    assert RELEASE.target_size(3000, 4000) == (1320, 1800)
    # just under the area: upscaled by 1.4, then clamped back to 1560^2
    assert RELEASE.target_size(1500, 1500) == (1560, 1560)


def test_small_images_are_lifted_to_the_minimum_area_then_floored():
    assert RELEASE.target_size(100, 100) == (480, 480)  # 140 -> 512 -> floor 480


def test_make_policy_picks_by_name_and_rejects_a_typo():
    assert isinstance(make_policy("default", 40), ResolutionPolicy)
    assert isinstance(make_policy("release", 80), ReleaseResolutionPolicy)
    assert make_policy("release", 80).target_size(1024, 1024) == (1360, 1360)
    with pytest.raises(ValueError, match="unknown resolution policy 'relase'"):
        make_policy("relase", 40)


def test_release_pixels_are_pil_bicubic():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (427, 640, 3), dtype=np.uint8))
    pixels = preprocess(image, RELEASE, normalized=False)
    expected = torch.from_numpy(np.asarray(image.resize((880, 560), Image.BICUBIC))).permute(2, 0, 1)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, 560, 880)
    assert torch.equal(pixels, expected)
    assert torch.equal(preprocess(image, RELEASE), normalize(expected))
