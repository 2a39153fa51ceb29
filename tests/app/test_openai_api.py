"""``--api URL``: the app's answers come from an OpenAI-compatible server (streamed SSE, images as data: URLs).

No such server ships with the project yet, so the test writes one: a loopback HTTP server that speaks
``/v1/models`` and streaming ``/v1/chat/completions`` and answers with ``LlavaUHD.generate`` on the same tiny
model. The app's answer must equal ``generate``'s; the encoder view keeps coming from the app's local encoder.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from llava_uhd.app.openai_client import OpenAIEngine, ServerError
from llava_uhd.app.uploads import Limits, read_upload

from .conftest import MAX_NEW_TOKENS, free_port, reference_answer, serve
from .test_api import text_of

SERVED = "tiny-llava-uhd"


def turns_and_images(messages: list[dict]) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI chat messages -> the model's turns (an ``<image>`` mark where each image part was) and the images."""
    turns, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            text = ""
            for part in content:
                if part["type"] == "image_url":
                    header, payload = part["image_url"]["url"].split(",", 1)
                    assert header.startswith("data:image/") and header.endswith(";base64")
                    images.append(Image.open(io.BytesIO(base64.b64decode(payload))))
                    text += "<image>\n"
                else:
                    text += part["text"]
            content = text
        turns.append({"role": message["role"], "content": content})
    return turns, images


class ReplayServer(ThreadingHTTPServer):
    """An OpenAI-compatible loopback server whose answers are ``LlavaUHD.generate``'s, streamed in small pieces."""

    daemon_threads = True

    def __init__(self, model) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.model, self.lock, self.requests = model, threading.Lock(), []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: ReplayServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.path != "/v1/chat/completions" or body.get("model") != SERVED:
            self.send_json(404, {"error": {"message": f"model {body.get('model')!r} is not served here"}})
            return
        turns, images = turns_and_images(body["messages"])
        with self.server.lock:
            result = self.server.model.generate(images, turns, max_new_tokens=body["max_tokens"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in self.events(result):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    @staticmethod
    def events(result) -> Iterator[dict]:
        text = result.text
        for start in range(0, len(text), 3):
            piece = text[start:start + 3]
            yield {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
        yield {"object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": len(result.token_ids)}}


@pytest.fixture(scope="module")
def server(reference_model) -> Iterator[ReplayServer]:
    server = ReplayServer(reference_model)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(demo_model_dir, server) -> Iterator[Client]:
    demo, url = serve("--model", str(demo_model_dir), "--api", server.url, "--device", "cpu", "--max-new-tokens",
                      str(MAX_NEW_TOKENS))
    yield Client(url, verbose=False)
    demo.close()


def test_answers_come_from_the_server_and_equal_generate(client, server, reference_model, photo):
    history, figures, summary = client.predict(images=[handle_file(str(photo))], question="What is in the picture?",
                                               api_name="/chat")
    assert text_of(history[-1]) == reference_answer(reference_model, photo, "What is in the picture?")
    sent = server.requests[-1]
    assert sent["model"] == SERVED and sent["stream"] and sent["temperature"] == 0 and sent["max_tokens"] == 6
    image_part = sent["messages"][0]["content"][0]["image_url"]["url"]
    assert base64.b64decode(image_part.split(",", 1)[1]) == photo.read_bytes()  # the very file, not re-encoded
    assert figures["new_tokens"] and figures["image_tokens"] == 54 and figures["ttft_ms"] > 0
    assert figures["encoder_ms"] is None and "OpenAI-compatible server" in figures["backend"]
    assert "encoder n/a" in summary

    history, _, _ = client.predict(images=[handle_file(str(photo))], question="And then?", api_name="/chat")
    turns = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
             {"role": "assistant", "content": text_of(history[1])}, {"role": "user", "content": "And then?"}]
    expected = reference_model.generate(Image.open(photo), turns, max_new_tokens=MAX_NEW_TOKENS).text
    assert text_of(history[-1]) == expected and server.requests[-1]["messages"][1]["role"] == "assistant"


def test_beam_search_is_refused_over_the_api(client, photo):
    with pytest.raises(AppError, match="beam search is offered with the in-process model only"):
        client.predict(images=[handle_file(str(photo))], question="Why?", num_beams=3, api_name="/chat")


def test_encoder_view_still_comes_from_the_local_encoder(client, photo):
    _, heatmap, _, numbers = client.predict(images=[handle_file(str(photo))], api_name="/encoder_view")
    assert numbers["tokens"] == 54 and len(numbers["stages"]) == 2 and heatmap


def test_server_failures_are_messages(server, photo):
    upload = read_upload(photo, Limits())
    turns = [{"role": "user", "content": "<image>\nWhat?"}]
    wrong_model = OpenAIEngine(server.url, "no-such-model")
    with pytest.raises(ServerError, match="answered 404: .*not served here"):
        list(wrong_model.answer([upload], turns, 1, 4))
    nobody = OpenAIEngine(f"http://127.0.0.1:{free_port()}", SERVED, timeout_s=5)
    with pytest.raises(ServerError, match="cannot reach the server"):
        list(nobody.answer([upload], turns, 1, 4))
    assert OpenAIEngine.served_model(server.url) == SERVED and OpenAIEngine.served_model(nobody.url, 2) is None
