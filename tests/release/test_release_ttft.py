"""Full-size TTFT FLOPs of the release setting (MoonViT ViT-UHD + mlp vs MoonViT GNE + merger, Qwen2-7B shape)."""

import pytest

from llava_uhd.bench.ttft import release_setting_flops, text_token_count, tiny_tokenizer

pytestmark = pytest.mark.slow  # full-size FLOP counting on the meta device: ~15 s


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return release_setting_flops(text_token_count(tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_release_rule_sizes_and_tokens(figures):
    uhd, gne = figures["release"]["uhd_mlp"], figures["release"]["gne_merger"]
    assert uhd["input"] == [1400, 1400] and uhd["llm_tokens"] == 1225
    assert gne["input"] == [1428, 1428] and gne["llm_tokens"] == (1428 // 28) ** 2
    default = figures["default"]
    assert default["uhd_mlp"]["llm_tokens"] == 676 and default["gne_merger"]["llm_tokens"] == 1369


def test_the_ratio_is_near_the_papers_1_9x(figures):
    for rule in ("default", "release"):
        entry = figures[rule]
        assert 1.7 < entry["ttft_flop_ratio"] < 2.1
        # the encoder saves FLOPs too, not only the LLM
        assert entry["gne_merger"]["encoder_tflop"] > 1.4 * entry["uhd_mlp"]["encoder_tflop"]
