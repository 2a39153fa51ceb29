"""A small OpenAI-API client and server runner for the served model (standard library only; no vLLM import).

Used by the tests and the benchmark from the main environment: :class:`Server` starts
``python -m llava_uhd.serve`` from the serving environment as a subprocess on 127.0.0.1 and waits, bounded in
time, for ``/health``; :func:`chat` sends one ``POST /v1/chat/completions`` (images as ``data:`` URLs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[3]
SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"


def data_url(image: Image.Image | bytes, fmt: str = "JPEG", mime: str | None = None) -> str:
    """A ``data:`` URL of an image (encoded as ``fmt``) or of raw bytes (sent as they are)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        payload, mime = buffer.getvalue(), mime or f"image/{fmt.lower()}"
    else:
        payload, mime = image, mime or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def chat_body(model: str, images: list[str], prompt: str, max_tokens: int = 16, stream: bool = False,
              **extra: Any) -> dict[str, Any]:
    """A greedy chat request: the images (``data:`` URLs) then the question, in one user turn."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": prompt})
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": stream, "return_token_ids": True, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Reply:
    """One answer (or error) of the server, with its timing."""

    status: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    error: dict[str, Any] | None = None
    ttft_s: float = 0.0
    total_s: float = 0.0


def post(url: str, body: dict[str, Any] | bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def chat(base_url: str, body: dict[str, Any] | bytes, timeout: float = 120.0) -> Reply:
    """POST /v1/chat/completions; a streamed body is read chunk by chunk (TTFT: the first content chunk)."""
    url = f"{base_url}/v1/chat/completions"
    start = time.perf_counter()
    if isinstance(body, dict) and body.get("stream"):
        return _stream(url, body, start, timeout)
    status, raw = post(url, body, timeout)
    total = time.perf_counter() - start
    try:
        payload = json.loads(raw)
    except ValueError:
        return Reply(status, error={"message": raw[:200].decode(errors="replace")}, total_s=total)
    if status != 200:
        return Reply(status, error=payload.get("error", payload), total_s=total)
    choice = payload["choices"][0]
    return Reply(status, choice["message"]["content"] or "", list(choice.get("token_ids") or []),
                 list(payload.get("prompt_token_ids") or []), ttft_s=total, total_s=total)


def _stream(url: str, body: dict[str, Any], start: float, timeout: float) -> Reply:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    reply = Reply(200)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("prompt_token_ids"):
                    reply.prompt_token_ids = list(chunk["prompt_token_ids"])
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    ids = choice.get("token_ids") or []
                    if (piece or ids) and not reply.ttft_s:
                        reply.ttft_s = time.perf_counter() - start
                    reply.text += piece
                    reply.token_ids += ids
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return Reply(err.code, error=json.loads(raw).get("error"))
        except ValueError:
            return Reply(err.code, error={"message": raw[:200].decode(errors="replace")})
    reply.total_s = time.perf_counter() - start
    return reply


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the process that started it dies, so that a killed test or
    benchmark run leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m llava_uhd.serve FOLDER`` from the serving environment, on 127.0.0.1, as a context manager."""

    def __init__(self, folder: str | Path, *args: str, python: str | Path = SERVE_PYTHON, port: int | None = None,
                 log: str | Path | None = None, start_timeout: float = 420.0) -> None:
        self.folder, self.args, self.python = Path(folder), list(args), Path(python)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = self.folder.name
        self.log_path = Path(log) if log else None
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.start_s = 0.0
        self._launched = 0.0

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch and wait until ``/health`` answers."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting (several servers boot side by side). The server gets SIGTERM when
        the thread that launched it ends: launch from a thread that outlives it."""
        if not self.python.is_file():
            raise FileNotFoundError(f"no serving environment at {self.python.parents[1]}: run `make serve-env`")
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [str(self.python), "-m", "llava_uhd.serve", str(self.folder), "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self._launched = time.perf_counter()
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        start_new_session=True, preexec_fn=_die_with_parent)

    def wait_ready(self) -> None:
        """Poll ``/health`` until it answers, the process exits (RuntimeError) or the start timeout passes."""
        assert self.process is not None, "launch() first"
        deadline = self._launched + self.start_timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} while starting"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                self.start_s = time.perf_counter() - self._launched
                return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the server did not answer /health within {self.start_timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # the server's own process group: it and its engine workers
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
