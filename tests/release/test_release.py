"""Reading the released LLaVA-UHD v3's LLaVA-format folder, and converting it to our model folder."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llava_uhd.convert import convert_release
from llava_uhd.convert import main as convert_main
from llava_uhd.errors import ReleaseError
from llava_uhd.llm import llm_config_from
from llava_uhd.mllm import LlavaUHD
from llava_uhd.release import llm_config, read_state
from llava_uhd.vision.resize import ReleaseResolutionPolicy, ResolutionPolicy

from .conftest import write_release

ENC = "model.vision_tower.vision_tower."


def photo(height=42, width=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def logits_of(model, image, prompt="What is in the image?"):
    pixels = model.preprocess(image)
    ids = torch.tensor([model.build_prompt_ids(prompt, [tuple(pixels.shape[-2:])])])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=[pixels]).logits


def test_every_tensor_of_a_sharded_release_is_accounted_for(release_dir, release_model):
    names = set(json.loads((release_dir / "model.safetensors.index.json").read_text())["weight_map"])
    report = release_model.load_report
    assert report.encoder + report.projector + report.llm + len(report.dropped) + len(report.unused) == len(names)
    assert report.unused == []
    assert report.dropped == [f"{ENC}encoder.blocks.{i}.merger.zero_init_fc.weight" for i in (0, 2)]
    assert report.projector == 4
    assert report.llm == len([n for n in names if not n.startswith((ENC, "model.mm_projector."))])


def test_tokenizer_gets_the_image_tokens_and_the_padded_embeddings_hold_them(release_model):
    report, tok = release_model.load_report, release_model.tokenizer
    assert report.added_tokens == ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
    rows = release_model.llm.get_input_embeddings().num_embeddings
    assert not report.resized_embeddings and rows % 64 == 0
    assert len(tok) <= rows and release_model.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < rows
    assert tok.tokenize("a <|image_pad|> b").count("<|image_pad|>") == 1  # one special token, never split


def test_embeddings_are_resized_only_when_the_new_ids_do_not_fit(tmp_path, tokenizer_dir):
    from llava_uhd.tokenizer import QWEN2_SPECIAL_TOKENS, build_tiny_tokenizer

    rows = len(build_tiny_tokenizer(tokenizer_dir, special_tokens=QWEN2_SPECIAL_TOKENS))
    model = LlavaUHD.from_pretrained(write_release(tmp_path / "rel", tokenizer_dir, vocab_rows=rows, sharded=False))
    assert model.load_report.resized_embeddings
    assert model.llm.get_input_embeddings().num_embeddings == len(model.tokenizer) == rows + 3


def test_the_parts_compute_what_the_release_tensors_say(release_dir, release_model):
    """Projector = proj.2(GELU_exact(proj.0(x))); LLM = a Qwen2 holding the same tensors."""
    state = read_state(release_dir)
    x = torch.randn(5, release_model.encoder.embed_dim)
    p = "model.mm_projector.proj."
    expected = F.linear(F.gelu(F.linear(x, state[p + "0.weight"], state[p + "0.bias"])), state[p + "2.weight"],
                        state[p + "2.bias"])
    torch.testing.assert_close(release_model.projector(x, [(1, 5)]), expected, rtol=0, atol=0)
    config = json.loads((release_dir / "config.json").read_text())
    reference = AutoModelForCausalLM.from_config(llm_config_from(llm_config(config))).eval()
    reference.load_state_dict({k: v for k, v in state.items() if not k.startswith((ENC, "model.mm_projector."))})
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(release_model.llm(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_release_to_ours_gives_identical_logits_and_keeps_the_release_rule(release_dir, release_model, tmp_path):
    _, report = convert_release(release_dir, tmp_path / "ours")
    assert report.unused == []
    ours = LlavaUHD.from_pretrained(tmp_path / "ours").eval()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["resize_policy"] == "release"
    assert isinstance(ours.policy, ReleaseResolutionPolicy)
    image = photo()
    direct, converted = logits_of(release_model, image), logits_of(ours, image)
    assert direct.shape[1] > ours.num_image_tokens(*ours.policy.target_size(42, 64))
    assert torch.equal(direct, converted)


def test_a_bfloat16_release_answers_and_converts_to_the_same_logits(tmp_path, tokenizer_dir):
    folder = write_release(tmp_path / "rel", tokenizer_dir, dtype=torch.bfloat16)
    direct = LlavaUHD.from_pretrained(folder).eval()
    assert direct.llm.dtype == torch.bfloat16 and direct.config.llm_dtype == "bfloat16"
    assert direct.generate(photo(), "What is this?", max_new_tokens=3).token_ids
    convert_release(folder, tmp_path / "ours")
    ours = LlavaUHD.from_pretrained(tmp_path / "ours").eval()
    assert ours.llm.dtype == torch.bfloat16
    assert torch.equal(logits_of(direct, photo()), logits_of(ours, photo()))


@pytest.mark.parametrize("side,tokens", [(512, 289), (768, 676), (1024, 1225)])
def test_release_rule_token_counts(release_model, side, tokens):
    assert isinstance(release_model.policy, ReleaseResolutionPolicy)
    assert release_model.num_image_tokens(*release_model.policy.target_size(side, side)) == tokens


def test_a_640_by_427_photo_takes_308_tokens(release_model):
    pixels = release_model.preprocess(photo(427, 640))
    assert tuple(pixels.shape) == (3, 560, 880)
    assert release_model.num_image_tokens(560, 880) == 308


def test_the_default_rule_can_be_asked_for(release_dir):
    model = LlavaUHD.from_pretrained(release_dir, resize_policy="default")
    assert isinstance(model.policy, ResolutionPolicy)
    assert model.policy.target_size(427, 640) == ResolutionPolicy(multiple=40).target_size(427, 640) != (560, 880)


def test_encoder_folder_config_is_read_and_a_missing_one_warns_once(tmp_path, tokenizer_dir, caplog):
    with_folder = write_release(tmp_path / "a", tokenizer_dir, encoder_folder=True, sharded=False)
    without = write_release(tmp_path / "b", tokenizer_dir, sharded=False)
    with caplog.at_level(logging.WARNING, logger="llava_uhd.release"):
        a = LlavaUHD.from_pretrained(with_folder)
        assert not [r for r in caplog.records if "mm_vision_tower" in r.message]
        LlavaUHD.from_pretrained(without)
        LlavaUHD.from_pretrained(without)
    assert len([r for r in caplog.records if "mm_vision_tower" in r.message]) == 1
    assert a.encoder.cfg.num_heads == 2 and a.encoder.cfg.wtc_layers == (1, 3)


def test_unknown_tensors_are_reported_by_name(tmp_path, tokenizer_dir, caplog):
    extra = {"model.mm_projector.proj.4.weight": torch.zeros(2), "model.image_newline": torch.zeros(4),
             "rogue.weight": torch.zeros(3)}
    with caplog.at_level(logging.WARNING, logger="llava_uhd.release"):
        model = LlavaUHD.from_pretrained(write_release(tmp_path / "rel", tokenizer_dir, extra=extra))
    assert model.load_report.unused == sorted(extra)
    assert "rogue.weight" in caplog.text and "model.image_newline" in caplog.text


def test_a_missing_llm_tensor_is_an_error_naming_it(tmp_path, tokenizer_dir):
    folder = write_release(tmp_path / "rel", tokenizer_dir, sharded=False)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ReleaseError, match=r"lack LLM tensors: model\.norm\.weight"):
        LlavaUHD.from_pretrained(folder)


def test_pickled_weights_are_refused_and_a_plain_folder_is_not_a_model(tmp_path, tokenizer_dir):
    folder = write_release(tmp_path / "rel", tokenizer_dir, sharded=False)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ReleaseError, match="pickled weights are never loaded"):
        LlavaUHD.from_pretrained(folder)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is not a model folder"):
        LlavaUHD.from_pretrained(tmp_path / "plain")


def test_convert_command_writes_a_folder(release_dir, tmp_path, capsys):
    assert convert_main(["release", "--src", str(release_dir), "--out", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "unused: none" in out and (tmp_path / "ours" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_convert_command_fails_clearly(release_dir, tmp_path, capsys):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text("{}")
    for args, message in [
        (("release", "--src", tmp_path / "nope", "--out", tmp_path / "x"), "no folder at"),
        (("release", "--src", tmp_path / "ours", "--out", tmp_path / "y"), "is not a LLaVA-format release"),
        (("release", "--src", release_dir, "--out", tmp_path / "ours"), "exists and is not empty"),
        (("relase", "--src", release_dir, "--out", tmp_path / "z"), "invalid choice"),
        (("release", "--src", release_dir), "the following arguments are required: --out"),
    ]:
        try:
            code = convert_main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        err = capsys.readouterr().err
        assert code != 0 and message in err, err
        assert "Traceback" not in err


def test_overwrite_refuses_a_folder_that_holds_the_release(release_dir, tmp_path, capsys):
    """``--out`` a parent of ``--src`` with ``--overwrite`` would delete the release: refused."""
    src = tmp_path / "parent" / "release"
    shutil.copytree(release_dir, src)
    args = ["release", "--src", str(src), "--out", str(tmp_path / "parent"), "--overwrite"]
    assert convert_main(args) == 1
    assert "holds --src" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in release_dir.iterdir())


def test_our_folder_loads_without_random_init_and_keeps_ties(tmp_path):
    """Our own folders: built on the meta device and assigned; tied embeddings stay one tensor; a folder that
    lacks a tensor is an error naming it."""
    from llava_uhd.llm import tiny_qwen2_config
    from llava_uhd.mllm import LlavaUHDConfig
    from llava_uhd.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tok")
    config = LlavaUHDConfig(encoder="vit_uhd_tiny_patch10_siglip", llm=tiny_qwen2_config(len(tok)),
                            tokenizer=str(tmp_path / "tok"))
    saved = LlavaUHD(config).save_pretrained(tmp_path / "ours")
    model = LlavaUHD.from_pretrained(saved)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    state = load_file(str(saved / "model.safetensors"))
    del state["encoder.norm.weight"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['encoder.norm.weight'\]"):
        LlavaUHD.from_pretrained(saved)


def test_damaged_release_folders_give_one_clear_error(tmp_path, tokenizer_dir):
    folder = write_release(tmp_path / "rel", tokenizer_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mm_projector_type": "mlp2x_gelu"}))
    with pytest.raises(ReleaseError, match="mm_projector_type 'mlp2x_gelu' is not supported"):
        LlavaUHD.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1152}))
    with pytest.raises(ReleaseError, match="mm_hidden_size 1152 but the encoder is 144 wide"):
        LlavaUHD.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ReleaseError, match="lists shards that are not there"):
        LlavaUHD.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ReleaseError, match="not a readable JSON config"):
        LlavaUHD.from_pretrained(folder)


def test_llm_config_from_builds_the_transformers_config_and_needs_a_model_type():
    assert llm_config_from({"model_type": "qwen2", "hidden_size": 32, "num_attention_heads": 4}).hidden_size == 32
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        llm_config_from({"hidden_size": 32})
