import csv
import json

import pytest

from llava_uhd.bench.__main__ import main
from llava_uhd.bench.tokens import ENCODERS as TOKEN_SPECS
from llava_uhd.bench.tokens import token_counts
from llava_uhd.bench.ttft import count_rows, flop_checks, text_token_count, tiny_tokenizer
from llava_uhd.bench.ttft_models import ENCODERS, llm_config


@pytest.fixture(scope="module")
def text_tokens(tmp_path_factory):
    return text_token_count(tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_full_size_flops_reproduce_the_paper_and_the_3x_ttft_gain(text_tokens):
    checks = flop_checks(text_tokens)
    # (a) uncompressed SO400M/14 at 1022^2 (73 x 73 tokens): 7.92 TFLOP; ViT-UHD at its 1040^2: 5.42 TFLOP
    assert checks["gne_encoder_tokens_1022"] == 5329
    assert round(checks["gne_encoder_tflop_1022"], 2) == 7.92
    assert checks["uhd_encoder_size_for_1022"] == [1040, 1040]
    assert round(checks["uhd_encoder_tflop_same_size"], 2) == 5.42
    # (b) 1024^2 request, Qwen2-7B prefill included: ViT-UHD + merger at least 3x fewer TTFT FLOPs than GNE
    assert checks["ttft_flop_ratio_1024"] >= 3.0
    modeled = checks["modeled_ttft_ms_1024"]
    assert modeled["gne"] / modeled["uhd_merger"] == pytest.approx(checks["ttft_flop_ratio_1024"])


def test_full_size_tokens_match_the_token_bench_and_prefill_is_2_params_tokens(text_tokens):
    rows = {r.encoder: r for r in count_rows("so400m-qwen2-7b", [1024], text_tokens, 0)}
    assert [(k.key, k.projector) for k in ENCODERS] == [
        ("gne", "merger"), ("sbe", "merger"), ("uhd", "mlp"), ("uhd_merger", "merger")]
    assert [s.projector for s in TOKEN_SPECS] == [k.projector for k in ENCODERS]
    expected = [c.tokens for c in token_counts([(1024, 1024)])]
    assert [rows[k.key].visual_tokens for k in ENCODERS] == expected == [1369, 1449, 676, 169]
    config = llm_config("so400m-qwen2-7b", 0)
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o, k, v, gate/up/down (biases negligible)
    for row in rows.values():
        linear = 2 * body * row.prompt_tokens + 2 * h * config["vocab_size"]  # + the last position's logits
        assert row.prompt_tokens == row.visual_tokens + text_tokens
        assert 1.0 <= row.prefill_flops / linear < 1.1  # the rest is attention (QK^T and AV)


def test_tiny_cli_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "ttft"
    assert main(["ttft", "--shape", "tiny", "--resolutions", "512", "--repeats", "1", "--warmup", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wall-clock ratio" in printed and "ViT-UHD + merger (64x)" in printed
    with open(out / "ttft_tiny.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["encoder"] for r in rows] == ["gne", "sbe", "uhd", "uhd_merger"]
    for row in rows:
        assert float(row["ttft_ms"]) == pytest.approx(float(row["encoder_ms"]) + float(row["prefill_ms"]), abs=2e-3)
        assert int(row["ttft_flops"]) == sum(int(row[k]) for k in ("encoder_flops", "projector_flops",
                                                                     "prefill_flops"))
        assert float(row["peak_mem_mb"]) >= 0
    result = json.loads((out / "ttft_tiny.json").read_text())
    assert result["memory"] and result["machine"] and len(result["ratios"]) == 3
    assert all(r["wall_ratio"] > 0 for r in result["ratios"])
    assert (out / "ttft_tiny.png").stat().st_size > 0


def test_moonvit_family_runs_the_rope_encoders_and_writes_its_own_files(tmp_path):
    from llava_uhd.bench.ttft_models import build_vits

    vits = build_vits("tiny", "moonvit")
    assert {k: v.registry_name for k, v in vits.items()} == {"gne": "vit_gne_tiny_patch14_moonvit",
                                                            "uhd": "vit_uhd_tiny_patch10_moonvit"}
    assert all(v.cfg.rope == "2d" for v in vits.values())
    out = tmp_path / "ttft"
    assert main(["ttft", "--shape", "tiny", "--family", "moonvit", "--resolutions", "512", "--repeats", "1",
                 "--out", str(out)]) == 0
    result = json.loads((out / "ttft_tiny_moonvit.json").read_text())
    assert result["family"] == "moonvit" and result["dtype"] == "float32" and not result["compiled"]
    assert not (out / "ttft_tiny.json").exists()  # only the family asked for
    assert all(r["ttft_ms"] > 0 for r in result["rows"])


def test_compile_models_compiles_each_shared_module_once(monkeypatch, tmp_path):
    import torch

    from llava_uhd.bench.ttft_models import build_models, compile_models

    models = build_models("tiny", tiny_tokenizer(tmp_path / "tok"), torch.device("cpu"))
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    compile_models(models)
    ids = [id(m) for m in compiled]
    assert len(ids) == len(set(ids))
    # 2 ViTs (SBE wraps the GNE one), 4 projectors, 1 shared LLM
    assert len(compiled) == 7 and sum(m is models["gne"].llm for m in compiled) == 1
    assert models["sbe"].encoder.base in compiled and models["uhd"].encoder in compiled


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "no CUDA device"),
        (["--shape", "so400m-qwen2-7b", "--compile"], "--compile needs a timed run"),
        (["--shape", "tiny", "--resolutions", "0"], "--resolutions must be positive"),
    ],
)
def test_ttft_bad_settings_are_one_message(args, message, tmp_path):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match=message):
        main(["ttft", *args, "--out", str(tmp_path)])


def test_ttft_out_that_cannot_be_made_stops_before_any_counting(tmp_path, monkeypatch):
    from llava_uhd.bench import ttft

    monkeypatch.setattr(ttft, "count_rows", lambda *a, **k: pytest.fail("counted before checking --out"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--out .*cannot create the results folder"):
        main(["ttft", "--shape", "tiny", "--out", str(tmp_path / "file" / "sub")])
