"""Serving through vLLM: greedy answers over HTTP equal ``LlavaUHD.generate``'s token for token; load; bad requests.

Reference answers come from ``LlavaUHD.from_pretrained`` on the same folder, given the same JPEG bytes the request
carries as a ``data:`` URL.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from llava_uhd.mllm import LlavaUHD
from llava_uhd.serve.client import Reply, chat, chat_body, data_url

pytestmark = pytest.mark.slow
MAX_TOKENS = 10
PROMPTS = ["Describe the image.", "What is in the picture?", "Answer with a single word or phrase."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(serve_folders):
    return {k: LlavaUHD.from_pretrained(f).eval() for k, f in serve_folders.items()}


def expected(model: LlavaUHD, images: list[bytes], prompt: str):
    return model.generate([Image.open(io.BytesIO(b)) for b in images], prompt, max_new_tokens=MAX_TOKENS)


def ask(server, images: list[bytes], prompt: str, stream: bool = False) -> Reply:
    return chat(server.base_url, chat_body(server.model, [data_url(b) for b in images], prompt, MAX_TOKENS, stream))


def check(reply: Reply, model: LlavaUHD, images: list[bytes], prompt: str) -> None:
    ref = expected(model, images, prompt)
    assert reply.status == 200, reply.error
    assert reply.token_ids == ref.token_ids
    sizes = [tuple(model.preprocess(Image.open(io.BytesIO(b))).shape[-2:]) for b in images]
    assert reply.prompt_token_ids == model.build_prompt_ids(prompt, sizes)  # the counter's placeholder runs


@pytest.mark.parametrize("kind", ["release", "export"])
def test_greedy_answers_equal_generate_on_photos_of_several_sizes(servers, models, photos, kind):
    for i, photo in enumerate(photos):
        check(ask(servers[kind], [photo], PROMPTS[i % 3]), models[kind], [photo], PROMPTS[i % 3])


@pytest.mark.parametrize("kind", ["release", "export"])
def test_several_images_per_request(servers, models, photos, kind):
    images = photos[1:3]
    check(ask(servers[kind], images, "Compare the two pictures."), models[kind], images, "Compare the two pictures.")


def test_eight_requests_at_once_and_streaming_give_the_same_answers(servers, models, photos):
    server, model = servers["export"], models["export"]
    jobs = [([photos[i % 4]], PROMPTS[i % 3]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: ask(server, *job), jobs))
    for reply, job in zip(replies, jobs):
        check(reply, model, *job)
    streamed = ask(server, [photos[0]], PROMPTS[0], stream=True)
    plain = ask(server, [photos[0]], PROMPTS[0])
    assert streamed.status == 200 and streamed.text == plain.text and streamed.token_ids == plain.token_ids


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 0).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def bad_requests(model: str, photo: bytes) -> dict[str, dict]:
    """Each is answered 4xx: the image is not one, cut, a bomb, too big; the prompt is too long; placeholders and
    images disagree; too many images; a content type the model does not take."""
    url = data_url(photo)
    return {
        "not an image": chat_body(model, [data_url(b"plain text, not pixels")], "Hi"),
        "truncated base64": chat_body(model, [url[:-7]], "Hi"),
        "truncated file": chat_body(model, [data_url(photo[: len(photo) // 2])], "Hi"),
        "decompression bomb": chat_body(model, [data_url(_png((20000, 20000)), mime="image/png")], "Hi"),
        "over the size limit": chat_body(model, [data_url(_png((6000, 4000)), mime="image/png")], "Hi"),
        "prompt past the context": chat_body(model, [url], "word " * 3000),
        "more placeholders than images": chat_body(model, [url], "<|image_pad|><|image_pad|> What?"),
        "more images than allowed": chat_body(model, [url] * 9, "Hi"),
        "audio content": {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            {"type": "text", "text": "Hi"}]}]},
        "text/plain data URL": chat_body(model, [data_url(b"abc", mime="text/plain")], "Hi"),
        "not JSON": b"{not json",
    }


def test_load_then_bad_requests_interleaved_with_good_ones(servers, models, photos):
    server, model = servers["export"], models["export"]
    jobs = [([photos[i % 4]], PROMPTS[i % 3]) for i in range(64)]
    references = {(p, q): expected(model, [p], q).token_ids for p in photos for q in PROMPTS}
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda job: ask(server, *job), jobs))
    assert time.perf_counter() - start < 300
    assert [r.status for r in replies] == [200] * 64
    assert all(r.token_ids == references[(job[0][0], job[1])] for r, job in zip(replies, jobs))

    bad = bad_requests(server.model, photos[1])
    sequence = [item for pair in zip(bad.items(), [None] * len(bad)) for item in pair]  # bad, good, bad, good...
    for i, item in enumerate(sequence):
        if item is None:
            photo, prompt = photos[i % 4], PROMPTS[i % 3]
            reply = ask(server, [photo], prompt)
            assert reply.status == 200 and reply.token_ids == references[(photo, prompt)]
            continue
        name, body = item
        reply = chat(server.base_url, body)
        assert 400 <= reply.status < 500, (name, reply.status, reply.error)
        assert isinstance(reply.error, dict) and reply.error.get("message"), name
        json.dumps(reply.error)
    assert server.healthy()
