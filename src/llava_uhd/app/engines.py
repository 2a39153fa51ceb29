"""Answering in the app: the conversation a session holds, and the in-process model that streams its answers.

A conversation is about the images uploaded with its first question: they are placed (``<image>`` marks) at the
start of the first user turn, exactly where ``LlavaUHD.generate(images, question)`` puts them, so a first answer
equals ``generate``'s. Follow-up questions are text turns after the earlier answers. Uploading other images
starts a new conversation.

An engine turns (images, turns, decoding settings) into a stream of :class:`Reply`: the text so far, then the
final text with the request's :class:`Figures`. :class:`EmbeddedEngine` runs ``LlavaUHD.generate`` in this
process (greedy answers stream token by token through transformers' ``TextIteratorStreamer``; beam search
cannot stream, so its answer arrives whole); :mod:`llava_uhd.app.openai_client` asks a server instead.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llava_uhd.conversation import IMAGE_PLACEHOLDER

from .uploads import InputError, Upload


@dataclass(frozen=True)
class Conversation:
    """What one session has said so far: its images and the finished (user, assistant) turns."""

    uploads: tuple[Upload, ...] = ()
    turns: tuple[dict, ...] = ()

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(u.digest for u in self.uploads)

    def with_images(self, uploads: list[Upload]) -> Conversation:
        """This conversation if it is about the same images (by content), else a new one about ``uploads``."""
        if tuple(u.digest for u in uploads) == self.key:
            return self
        return Conversation(tuple(uploads))

    def prompt(self, question: str) -> list[dict]:
        """Chat turns to answer: earlier turns, then ``question``; the images open the first user turn."""
        if not self.turns:
            question = f"{IMAGE_PLACEHOLDER}\n" * len(self.uploads) + question
        return [*self.turns, {"role": "user", "content": question}]

    def answered(self, question: str, answer: str) -> Conversation:
        """The conversation with this exchange added."""
        turns = self.prompt(question)
        return dataclasses.replace(self, turns=(*turns, {"role": "assistant", "content": answer}))

    def questions(self) -> list[str]:
        """The user's questions as typed (image marks removed), in order."""
        return [t["content"].replace(f"{IMAGE_PLACEHOLDER}\n", "") for t in self.turns if t["role"] == "user"]


@dataclass
class Figures:
    """What one answer cost. ``None``: the backend does not report it (a server measures its own encoder)."""

    backend: str
    num_beams: int
    new_tokens: int | None = None
    image_tokens: int | None = None
    prompt_tokens: int | None = None
    encoder_ms: float | None = None
    """Vision encoder forward."""
    prefill_ms: float | None = None
    """LLM forward over the prompt, up to the first token's logits."""
    ttft_ms: float | None = None
    """Time to first token (in process: encoder + projector + prefill; over an API: first streamed text)."""
    decode_tokens_per_s: float | None = None
    total_ms: float | None = None
    """The whole request as the app saw it."""

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}

    def summary(self) -> str:
        """One line for the page."""
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f} ms"

        tokens = "?" if self.new_tokens is None else str(self.new_tokens)
        image = "?" if self.image_tokens is None else str(self.image_tokens)
        return (f"**{tokens}** answer tokens · **{image}** image tokens · encoder {ms(self.encoder_ms)} · "
                f"prefill {ms(self.prefill_ms)} · TTFT {ms(self.ttft_ms)} · total {ms(self.total_ms)} · "
                f"{'greedy' if self.num_beams == 1 else f'{self.num_beams} beams'} ({self.backend})")


@dataclass
class Reply:
    """The answer so far; ``figures`` is set on the last reply of a request only."""

    text: str
    figures: Figures | None = None


class Engine(Protocol):
    """Something that answers a conversation about images."""

    name: str
    beams: bool
    """Whether beam search (``num_beams > 1``) is offered."""

    def answer(self, uploads: list[Upload], turns: list[dict], num_beams: int,
               max_new_tokens: int) -> Iterator[Reply]: ...


@dataclass
class EmbeddedEngine:
    """``LlavaUHD.generate`` in this process. ``lock`` serialises every use of the model (answers and the encoder
    view), so the encoder's forward hooks and caches only ever see one request."""

    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    name: str = "in process"
    beams: bool = True

    def pixels(self, uploads: list[Upload]) -> list[torch.Tensor]:
        """Each image through the model's own preprocessing (its resize policy), as ``generate`` does it."""
        out = []
        for upload in uploads:
            try:
                out.append(self.model.preprocess(upload.open()))
            except Exception as err:  # checked at upload, so only a file PIL decodes once but not twice
                raise InputError(f"{upload.name}: cannot be decoded for the model ({err})") from err
        return out

    def answer(self, uploads: list[Upload], turns: list[dict], num_beams: int,
               max_new_tokens: int) -> Iterator[Reply]:
        from transformers import TextIteratorStreamer

        start = time.perf_counter()
        pixels = self.pixels(uploads)
        streamer = None
        if num_beams == 1:  # transformers cannot stream beam search
            streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with self.lock:
                    extra = {"streamer": streamer} if streamer is not None else {}
                    outcome["result"] = self.model.generate(pixels, turns, max_new_tokens=max_new_tokens,
                                                            num_beams=num_beams, **extra)
            except BaseException as err:  # handed to the request's thread, which reports it
                outcome["error"] = err
            finally:
                if streamer is not None:
                    streamer.end()

        worker = threading.Thread(target=run, name="llava-uhd-generate", daemon=True)
        worker.start()
        text = ""
        for piece in streamer or ():
            if piece:
                text += piece
                yield Reply(text)
        worker.join()
        if "error" in outcome:
            err = outcome["error"]
            if isinstance(err, ValueError):  # e.g. a conversation the chat template refuses
                raise InputError(f"the model cannot answer this conversation: {err}") from err
            raise err
        result = outcome["result"]
        figures = Figures(self.name, num_beams, len(result.token_ids), result.num_image_tokens,
                          result.num_prompt_tokens, result.encoder_ms, result.prefill_ms, result.ttft_ms,
                          result.decode_tokens_per_s, (time.perf_counter() - start) * 1e3)
        yield Reply(result.text, figures)
