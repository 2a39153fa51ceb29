"""The encoder's token-count interface: LLM positions per image, the resolution policy and the worker counter."""

import pickle

import pytest
import timm

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.projector import build_projector
from llava_uhd.vision.resize import ReleaseResolutionPolicy, ResolutionPolicy

# (encoder, projector) -> pixels per LLM token side, and the LLM tokens of a 480 x 320 image
CASES = [
    ("vit_uhd_tiny_patch10_siglip", "mlp", 40, 12 * 8),
    ("vit_uhd_tiny_patch10_siglip", "merger", 80, 6 * 4),
    ("vit_gne_tiny_patch14_moonvit", "merger", 28, (476 // 28) * (308 // 28)),
]


@pytest.mark.parametrize(("name", "kind", "step", "tokens"), CASES)
def test_num_image_tokens_policy_and_counter_agree(name, kind, step, tokens):
    encoder = timm.create_model(name, depth=4)
    projector = build_projector(kind, encoder.embed_dim, 32)
    h, w = 480 // step * step, 320 // step * step
    assert encoder.num_image_tokens(h, w, projector) == tokens
    counter = pickle.loads(pickle.dumps(encoder.token_counter(projector)))
    for size in ((h, w), (step, step), (2 * step, 5 * step), (7 * step, 3 * step)):
        gh, gw = projector.output_grid(*encoder.output_grid(*size))
        assert encoder.num_image_tokens(*size, projector) == counter(*size) == gh * gw
    default = encoder.policy(projector, min_pixels=64 * 64, max_pixels=640 * 640, max_side=900)
    assert default == ResolutionPolicy(64 * 64, 640 * 640, 900, multiple=step)
    release = encoder.policy(projector, name="release")
    assert release == ReleaseResolutionPolicy(multiple=step)
    target = release.target_size(1000, 700)
    assert target[0] % step == 0 and target[1] % step == 0


def test_policy_rejects_an_unknown_name():
    encoder = timm.create_model("vit_uhd_tiny_patch10_siglip", depth=4)
    with pytest.raises(ValueError, match="unknown resolution policy 'relase'"):
        encoder.policy(build_projector("mlp", encoder.embed_dim, 32), name="relase")
