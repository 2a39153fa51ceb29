"""The encoder's token-count interface agrees with the functions the model used before it existed."""

import pickle

import pytest
import timm

import llava_uhd.vision  # noqa: F401  (registers the models)
from llava_uhd.mllm import count_image_tokens, resolution_policy
from llava_uhd.projector import build_projector

SIZES = [(160, 160), (80, 240), (320, 160), (480, 400)]


@pytest.mark.parametrize("name", ["vit_uhd_tiny_patch10_siglip", "vit_gne_tiny_patch14_moonvit"])
@pytest.mark.parametrize("kind", ["mlp", "merger"])
def test_num_image_tokens_policy_and_counter_match_the_model_functions(name, kind):
    encoder = timm.create_model(name, depth=4)
    projector = build_projector(kind, encoder.embed_dim, 32)
    counter = pickle.loads(pickle.dumps(encoder.token_counter(projector)))
    step = encoder.reduction * projector.merge
    for policy_name in ("default", "release"):
        ours = encoder.policy(projector, min_pixels=64 * 64, max_pixels=640 * 640, max_side=900, name=policy_name)
        old = resolution_policy(encoder, projector, 64 * 64, 640 * 640, 900, name=policy_name)
        assert ours == old
        assert ours.multiple == step
    for h, w in SIZES:
        h, w = h // step * step or step, w // step * step or step
        expected = count_image_tokens(encoder, projector, h, w)
        assert encoder.num_image_tokens(h, w, projector) == expected
        assert counter(h, w) == expected


def test_policy_rejects_an_unknown_name():
    encoder = timm.create_model("vit_uhd_tiny_patch10_siglip", depth=4)
    with pytest.raises(ValueError, match="unknown resolution policy 'relase'"):
        encoder.policy(build_projector("mlp", encoder.embed_dim, 32), name="relase")
