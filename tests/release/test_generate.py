"""``python -m llava_uhd.generate`` on a release folder and on our own folder; its errors."""

import json
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llava_uhd.generate import main
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
from llava_uhd.tokenizer import build_tiny_tokenizer

PROMPT = "What colour is the shape?"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def our_dir(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(tok)
    config = LlavaUHDConfig(encoder="vit_uhd_tiny_patch10_siglip", projector="mlp", llm={
        "model_type": "qwen2", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}, tokenizer=str(tok),
        min_pixels=40 * 40, max_pixels=160 * 160)
    return LlavaUHD(config).save_pretrained(tmp_path_factory.mktemp("ours") / "model")


def test_json_answer_on_our_folder_is_what_the_model_generates(our_dir, image_file):
    done = subprocess.run([sys.executable, "-m", "llava_uhd.generate", "--model", str(our_dir), "--image",
                           str(image_file), "--prompt", PROMPT, "--max-new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    expected = LlavaUHD.from_pretrained(our_dir).eval().generate(Image.open(image_file), PROMPT, max_new_tokens=6)
    assert record["answer"] == expected.text and record["new_tokens"] == len(expected.token_ids)
    assert record["image_tokens"] == expected.num_image_tokens > 0
    assert record["ttft_ms"] >= record["encoder_ms"] > 0 and record["prefill_ms"] > 0
    assert record["resize_policy"] == "default"


def test_release_folder_streams_on_a_terminal(release_dir, image_file):
    """stdout a terminal: the answer streams (TextStreamer), then the timing line."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llava_uhd.generate", "--model", str(release_dir), "--image",
                             str(image_file), "--prompt", PROMPT, "--max-new-tokens", "5"],
                            stdout=follower, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.read()
    assert "TTFT" in out and "tokens/s" in out and "encoder" in out and "prefill" in out
    answer = out.split("encoder ")[0].strip()
    model = LlavaUHD.from_pretrained(release_dir).eval()
    expected = model.generate(Image.open(image_file), PROMPT, max_new_tokens=5).text.strip()
    assert expected and answer.replace("\r", "") == expected  # printed only by the streamer


def test_bad_inputs_exit_non_zero_with_one_message(tmp_path, our_dir, image_file, capsys):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    (tmp_path / "empty").mkdir()
    model = ["--model", str(our_dir)]
    cases = [
        (["--model", str(tmp_path / "missing"), "--image", str(image_file), "--prompt", "x"], "no model folder at"),
        (["--model", str(tmp_path / "empty"), "--image", str(image_file), "--prompt", "x"], "is not a model folder"),
        ([*model, "--image", str(tmp_path / "gone.png"), "--prompt", "x"], "no image file at"),
        ([*model, "--image", str(text_file), "--prompt", "x"], "cannot read"),
        ([*model, "--image", str(image_file), "--prompt", "x", "--num-beams", "0"],
         "argument --num-beams: must be at least 1, got 0"),
        ([*model, "--image", str(image_file), "--prompt", "x", "--max-new-tokens", "many"],
         "argument --max-new-tokens: expected a whole number, got 'many'"),
        ([*model, "--image", str(image_file), "--prompt", "<image> and <image>"], "2 placeholders for 1 images"),
        ([*model, "--image", str(image_file), "--prompt", "   "], "--prompt"),
        ([*model, "--image", str(image_file), "--prompt", "x", "--resize-policy", "relase"], "invalid choice"),
        ([*model, "--image", str(image_file), "--prompt", "x", "--devise", "cpu"], "unrecognized arguments"),
        ([*model, "--image", str(image_file), "--prompt", "x", "--device", "cpuu"], "--device cpuu: not a device name"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code != 0, argv
        assert message in err and "Traceback" not in err, (argv, err)


def test_two_images_in_one_prompt(our_dir, image_file, tmp_path, capsys):
    second = tmp_path / "second.png"
    Image.fromarray(np.zeros((80, 40, 3), dtype=np.uint8)).save(second)
    argv = ["--model", str(our_dir), "--image", str(image_file), "--image", str(second), "--prompt",
            "Compare <image> with <image>.", "--max-new-tokens", "3", "--json", "--device", "cpu"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    model = LlavaUHD.from_pretrained(our_dir)
    sizes = [tuple(model.preprocess(Image.open(p)).shape[-2:]) for p in (image_file, second)]
    assert record["image_tokens"] == sum(model.num_image_tokens(*s) for s in sizes)
    assert record["images"] == [str(image_file), str(second)]


def test_training_after_generate_on_the_same_image_size(release_dir):
    """Generation leaves no inference-mode tensors in the encoder's caches (index orders, RoPE tables)."""
    import torch

    model = LlavaUHD.from_pretrained(release_dir)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (44, 52, 3), dtype=np.uint8))
    model.eval().generate(image, PROMPT, max_new_tokens=2)
    pixels = model.preprocess(image)
    ids = torch.tensor([model.build_prompt_ids(PROMPT, [tuple(pixels.shape[-2:])])])
    model.train()
    loss = model(input_ids=ids, labels=ids, pixel_values=[pixels]).loss
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_exif_rotated_photo_is_read_upright(tmp_path):
    """A phone JPEG stored landscape with orientation 6 (rotate 90) reaches the model as the portrait it shows."""
    from llava_uhd.generate import open_images

    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    stored.save(tmp_path / "plain.jpg", quality=95)
    rotated, plain = open_images([str(tmp_path / "phone.jpg"), str(tmp_path / "plain.jpg")])
    assert rotated.size == (30, 60) and plain.size == (60, 30)


def test_a_truncated_weights_file_in_our_folder_is_one_message(tmp_path, our_dir, image_file, capsys):
    """A download cut short: safetensors' own error type is named with the file, not a traceback."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(our_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 9 // 10])
    assert main(["--model", str(broken), "--image", str(image_file), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: not a readable safetensors file" in err and "Traceback" not in err


def test_a_decompression_bomb_is_one_message(our_dir, image_file, capsys, monkeypatch):
    """PIL's DecompressionBombError is not an OSError: it is caught and named like any unreadable image."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 70x50 photo is then over twice the limit
    assert main(["--model", str(our_dir), "--image", str(image_file), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "decompression bomb" in err
