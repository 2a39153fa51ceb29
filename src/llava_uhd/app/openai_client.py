"""``--api URL``: the app's answers come from an OpenAI-compatible server instead of the model in this process.

Each request is ``POST {URL}/v1/chat/completions`` with ``"stream": true``: the images travel inside the first
user message as ``data:`` URLs of the uploaded bytes (not re-encoded, so the server decodes the very file the
user gave), the answer comes back as server-sent events (``data: {json}`` lines, ``data: [DONE]`` at the end)
whose ``choices[0].delta.content`` pieces are shown as they arrive. Decoding is greedy (``temperature`` 0);
beam search is only offered in process. The server reports token counts when it honours
``stream_options.include_usage``; the time to first token is the app's own clock (request sent to first text).

Nothing here is specific to one server; the project does not ship one yet (serving is future work), and its
tests run this client against a small loopback server that answers with ``LlavaUHD.generate``.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from llava_uhd.conversation import IMAGE_PLACEHOLDER

from .engines import Figures, Reply
from .uploads import InputError, Upload

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server could not be reached or answered with an error; the message says which and is shown as is."""


def check_url(url: str) -> str:
    """The server's base URL without a trailing ``/`` or ``/v1``; ``ValueError`` for a URL that is not http(s)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--api {url!r}: expected an http(s) URL such as http://127.0.0.1:8000")
    base = url.strip().rstrip("/")
    return base.removesuffix("/v1")


def data_url(upload: Upload) -> str:
    """The upload's bytes as a ``data:`` URL."""
    return f"data:{upload.mime_type};base64,{base64.b64encode(upload.data).decode('ascii')}"


def openai_messages(uploads: list[Upload], turns: list[dict]) -> list[dict]:
    """Chat turns with ``<image>`` marks -> OpenAI messages: each mark becomes the next image's ``image_url`` part."""
    images = iter(uploads)
    messages = []
    for turn in turns:
        content = turn["content"]
        if turn["role"] != "user" or IMAGE_PLACEHOLDER not in content:
            messages.append({"role": turn["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            text = text.removeprefix("\n") if i else text
            if i:
                parts.append({"type": "image_url", "image_url": {"url": data_url(next(images))}})
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": parts})
    return messages


@dataclass
class OpenAIEngine:
    """Streams answers from an OpenAI-compatible ``/v1/chat/completions``; ``model_name`` is sent as ``model``.

    ``count_image_tokens``: the local model's count for an upload (what the server's model costs when it is the
    same model), shown beside the server's figures."""

    url: str
    model_name: str
    count_image_tokens: Any = None
    timeout_s: float = 300.0
    name: str = "OpenAI-compatible server"
    beams: bool = False

    @staticmethod
    def served_model(url: str, timeout_s: float = 5.0) -> str | None:
        """The first model id ``GET {url}/v1/models`` lists, or None when the server cannot say."""
        try:
            response = httpx.get(f"{url}/v1/models", timeout=timeout_s)
            response.raise_for_status()
            models = response.json().get("data") or []
            return str(models[0]["id"]) if models else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            log.warning("could not ask %s/v1/models which model it serves (%s)", url, err)
            return None

    def answer(self, uploads: list[Upload], turns: list[dict], num_beams: int,
               max_new_tokens: int) -> Iterator[Reply]:
        if num_beams != 1:
            raise InputError("beam search is offered with the in-process model only; set beams to 1 with --api")
        body = {"model": self.model_name, "messages": openai_messages(uploads, turns), "stream": True,
                "max_tokens": max_new_tokens, "temperature": 0.0, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        text, usage = "", {}
        for event in self._events(body):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.perf_counter()
                    text += piece
                    yield Reply(text)
        end = time.perf_counter()
        image_tokens = sum(self.count_image_tokens(u) for u in uploads) if self.count_image_tokens else None
        new_tokens = usage.get("completion_tokens")
        decode_s = end - first if first else 0.0
        figures = Figures(self.name, num_beams, new_tokens, image_tokens, usage.get("prompt_tokens"),
                          ttft_ms=(first - start) * 1e3 if first else None,
                          decode_tokens_per_s=(new_tokens - 1) / decode_s if new_tokens and decode_s > 0 else None,
                          total_ms=(end - start) * 1e3)
        yield Reply(text, figures)

    def _events(self, body: dict) -> Iterator[dict]:
        """The JSON payloads of the server's ``data:`` lines, until ``[DONE]``; ServerError on any failure."""
        endpoint = f"{self.url}/v1/chat/completions"
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        try:
            with httpx.stream("POST", endpoint, json=body, timeout=timeout) as response:
                if response.status_code != 200:
                    detail = response.read().decode("utf-8", "replace")[:300]
                    raise ServerError(f"the server at {self.url} answered {response.status_code}: {detail}")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue  # comments, event names, keep-alives
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    try:
                        event = json.loads(payload)
                    except json.JSONDecodeError as err:
                        raise ServerError(f"the server at {self.url} sent a line that is not JSON: "
                                          f"{payload[:120]!r}") from err
                    if isinstance(event, dict) and event.get("error"):
                        raise ServerError(f"the server at {self.url} reported an error: {event['error']}")
                    if isinstance(event, dict):
                        yield event
        except httpx.TimeoutException as err:
            raise ServerError(f"the server at {self.url} did not answer within {self.timeout_s:g} s") from err
        except httpx.HTTPError as err:
            raise ServerError(f"cannot reach the server at {self.url}: {err}") from err
