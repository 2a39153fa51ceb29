"""The app's Gradio API through ``gradio_client``: answers equal ``LlavaUHD.generate``, they stream, a conversation
goes on, the encoder view's numbers are the encoder's, bad input is a message, and eight clients at once all get
their own right answer. One app (in process, tiny model) serves the whole module."""

from __future__ import annotations

import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from .conftest import MAX_NEW_TOKENS, reference_answer
from .test_encoder_view import assert_map_is_gate_output, gate_outputs, window_image


def text_of(message: dict) -> str:
    """The text of a Chatbot message as the API returns it."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


@pytest.fixture(scope="module")
def client(app_url: str) -> Client:
    return Client(app_url, verbose=False)


def ask(client: Client, image, question: str, **settings):
    images = [handle_file(str(image))] if image is not None else []
    return client.predict(images=images, question=question, api_name="/chat", **settings)


def test_answer_streams_and_equals_generate(client, reference_model, photo):
    client.predict(api_name="/new_chat")
    job = client.submit(images=[handle_file(str(photo))], question="What is in the picture?", api_name="/chat")
    updates = [text_of(history[-1]) for history, *_ in job]
    history, figures, summary = job.result()
    reference = reference_model.generate(Image.open(photo), "What is in the picture?", max_new_tokens=MAX_NEW_TOKENS)
    expected = reference.text
    assert expected and text_of(history[-1]) == expected == figures["answer"]
    assert len(updates) >= 2 and all(expected.startswith(u) for u in updates)  # shown as it grows
    assert figures["new_tokens"] == len(reference.token_ids)
    assert figures["image_tokens"] == 54 and figures["num_beams"] == 1
    assert 0 < figures["encoder_ms"] < figures["ttft_ms"] and figures["prefill_ms"] > 0
    assert "54** image tokens" in summary and "TTFT" in summary


def test_follow_up_continues_the_conversation(client, reference_model, photo):
    client.predict(api_name="/new_chat")
    first = text_of(ask(client, photo, "Describe it.")[0][-1])
    history, figures, _ = ask(client, photo, "And the colours?")
    turns = [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": first},
             {"role": "user", "content": "And the colours?"}]
    expected = reference_model.generate(Image.open(photo), turns, max_new_tokens=MAX_NEW_TOKENS).text
    assert len(history) == 4 and text_of(history[-1]) == expected
    assert figures["prompt_tokens"] > 54 + 10
    history, _, _ = client.predict(api_name="/new_chat")
    assert history == []


def test_beam_search_equals_generate(client, reference_model, photo):
    client.predict(api_name="/new_chat")
    history, figures, _ = ask(client, photo, "What is it?", num_beams=2)
    assert text_of(history[-1]) == reference_answer(reference_model, photo, "What is it?", num_beams=2)
    assert figures["num_beams"] == 2


def test_encoder_view_numbers_are_the_gate_output(client, reference_model, tmp_path):
    path = window_image(tmp_path / "windows.png")
    grid, heatmap, costs, numbers = client.predict(images=[handle_file(str(path))], which=1,
                                                   api_name="/encoder_view")
    assert Image.open(grid).width >= 640 and Image.open(heatmap).format == "PNG"
    assert numbers["tokens"] == 54 and numbers["token_grid"] == [6, 9] and numbers["pixels_per_token"] == 40
    assert "| ViT-UHD (mlp, 16x) |" in costs and "| GNE (patch 14, merger) |" in costs
    expected = gate_outputs(reference_model, reference_model.preprocess(Image.open(path)))
    for stage, windows in zip(numbers["stages"], expected, strict=True):
        assert_map_is_gate_output(torch.tensor(stage["weights"]), windows)
        assert not stage["uniform"]


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header claims ``width x height`` pixels (a decompression bomb when large)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def bad_files(tmp_path, photo) -> dict:
    data = photo.read_bytes()
    files = {
        "not_an_image.jpg": (b"these are words, not pixels", "not an image file"),
        "notes.txt": (b"hello", "Invalid file type"),
        "cut_short.jpg": (data[: len(data) // 2], "damaged or cut short"),
        "bomb.png": (png_header(40_000, 40_000), "refused without decoding"),
        "too_many_pixels.png": (png_header(5_000, 5_000), "4 megapixel limit"),
        "too_big.png": (None, "exceeds the maximum file size"),
        "strip.png": (None, "longer than 50:1"),
    }
    out = {}
    for name, (content, message) in files.items():
        path = tmp_path / name
        if name == "too_big.png":  # past the 2 MB upload limit the test app runs with
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(path)
        elif name == "strip.png":
            Image.new("RGB", (400, 4), "red").save(path)
        else:
            path.write_bytes(content)
        out[name] = (path, message)
    return out


def test_bad_input_is_a_message_and_the_app_keeps_serving(client, reference_model, photo, tmp_path):
    for name, (path, message) in bad_files(tmp_path, photo).items():
        for endpoint in ("/chat", "/encoder_view"):
            kwargs = {"question": "What is it?"} if endpoint == "/chat" else {}
            with pytest.raises(Exception, match=message) as caught:
                client.predict(images=[handle_file(str(path))], api_name=endpoint, **kwargs)
            assert "Traceback" not in str(caught.value), name
    with pytest.raises(AppError, match="the question is empty"):
        ask(client, photo, "   ")
    with pytest.raises(AppError, match="greater than maximum value 5"):
        ask(client, photo, "What is it?", num_beams=9)
    with pytest.raises(AppError, match="image number: 3 is outside 1..1"):
        client.predict(images=[handle_file(str(photo))], which=3, api_name="/encoder_view")
    client.predict(api_name="/new_chat")
    assert text_of(ask(client, photo, "Still there?")[0][-1]) == reference_answer(reference_model, photo,
                                                                                  "Still there?")


def test_eight_clients_at_once_each_get_their_answer(app_url, reference_model, photo, tmp_path):
    pictures = [photo, window_image(tmp_path / "w.png", seed=1)]
    jobs = [(pictures[i % 2], f"Question number {i}?") for i in range(8)]
    expected = [reference_answer(reference_model, image, question) for image, question in jobs]

    def one(job):
        image, question = job
        return text_of(ask(Client(app_url, verbose=False), image, question)[0][-1])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, jobs))
    elapsed = time.perf_counter() - start
    assert answers == expected
    print(f"8 concurrent clients answered in {elapsed:.2f} s")
