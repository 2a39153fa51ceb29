"""The page and its API: a Gradio ``Blocks`` with a chat and the encoder view, each a named endpoint.

API (``gradio_client``; documented in docs/app.md):

- ``/chat(images, question, num_beams, max_new_tokens) -> (history, figures, summary)``: streams; the session
  keeps the conversation (same images again: a follow-up question; other images: a new conversation);
- ``/encoder_view(images, which) -> (token_grid, gate_heatmap, costs, numbers)``: what the encoder keeps of image
  ``which`` (1-based);
- ``/new_chat() -> (history, figures, summary)``: forget the session's conversation.

Bad input (a file that is not an image, damaged or too large, an empty question, a setting out of range) raises
``gr.Error``: the page shows the message, an API client gets it as ``AppError``, and the app keeps serving.
"""

from __future__ import annotations

import html
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from .encoder_view import cost_table, encoder_label, gate_picture, inspect_image, token_grid_picture
from .engines import Conversation, Engine, Reply
from .openai_client import ServerError
from .uploads import InputError, Limits, check_question, read_uploads

log = logging.getLogger(__name__)

MAX_BEAMS = 5
MAX_NEW_TOKENS = 2048
EMPTY_VIEW = "Upload an image to see the tokens the encoder keeps and its WTC gate weights."


@dataclass
class DemoApp:
    """The handlers behind the page; ``model`` draws the encoder view, ``engine`` answers."""

    model: Any
    engine: Engine
    lock: threading.Lock = field(default_factory=threading.Lock)
    limits: Limits = field(default_factory=Limits)
    model_name: str = "model"
    max_new_tokens: int = 256
    chat_concurrency: int = 1
    queue_size: int = 32

    # -- handlers ----------------------------------------------------------------------------------------------
    def chat(self, images: list | None, question: str, num_beams: float, max_new_tokens: float,
             conversation: Conversation | None) -> Iterator[tuple]:
        """Answer ``question`` about ``images`` in the session's conversation; yields as the answer streams."""
        conversation = conversation or Conversation()
        try:
            beams = _whole(num_beams, "beams", 1, MAX_BEAMS)
            new_tokens = _whole(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS)
            uploads = read_uploads(images, self.limits)
            text = check_question(question, self.limits)
            conversation = conversation.with_images(uploads)
            yield _history(conversation, text), {}, "answering...", conversation
            reply = Reply("")
            for reply in self.engine.answer(list(conversation.uploads), conversation.prompt(text), beams,
                                            new_tokens):
                if reply.figures is None:
                    yield _history(conversation, text, reply.text), {}, "answering...", conversation
        except (InputError, ServerError) as err:
            raise _shown(str(err)) from err
        except Exception as err:  # the request fails, the app keeps serving
            log.exception("chat request failed")
            raise _shown(f"the model failed on this request ({type(err).__name__}: {err})") from err
        done = conversation.answered(text, reply.text)
        figures = reply.figures.as_dict() if reply.figures else {}
        summary = reply.figures.summary() if reply.figures else ""
        yield _history(done), {"answer": reply.text, **figures}, summary, done

    def new_chat(self) -> tuple:
        """Forget the conversation."""
        return [], {}, "", Conversation()

    def encoder_view(self, images: list | None, which: float | None = 1) -> tuple:
        """What the encoder keeps of image ``which`` (1-based) of ``images``: two pictures, a table, the numbers."""
        try:
            uploads = read_uploads(images, self.limits)
            if not uploads:
                return None, None, EMPTY_VIEW, {}
            index = _whole(which if which is not None else 1, "image number", 1, len(uploads))
            view = inspect_image(self.model, uploads[index - 1], self.lock)
        except InputError as err:
            raise _shown(str(err), "Cannot show this image") from err
        except Exception as err:
            log.exception("encoder view failed")
            raise _shown(f"the encoder view failed ({type(err).__name__}: {err})", "Cannot show this image") from err
        return token_grid_picture(view), gate_picture(view), cost_table(view), view.as_dict()

    # -- page --------------------------------------------------------------------------------------------------
    def header(self) -> str:
        ppt = self.model.pixels_per_token
        return (f"# LLaVA-UHD v3: chat, and what the encoder keeps\n"
                f"Model **{html.escape(self.model_name)}**: `{encoder_label(self.model)}`, one LLM token per "
                f"{ppt}x{ppt} px. Answers: **{html.escape(self.engine.name)}**; encoder views: this process.")

    def build(self) -> gr.Blocks:
        """The page; every event is queued, at most ``chat_concurrency`` answers at once."""
        with gr.Blocks(title="LLaVA-UHD v3 demo", analytics_enabled=False,
                       delete_cache=(3600, 3600)) as demo:  # uploads and pictures live an hour
            conversation = gr.State(Conversation())
            gr.Markdown(self.header(), elem_id="header")
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=380, feedback_options=None,
                                         placeholder="Upload images, ask a question.")
                    question = gr.Textbox(label="Question", placeholder="What is in the image?", elem_id="question",
                                          lines=1, max_lines=6)
                    with gr.Row():
                        ask = gr.Button("Ask", variant="primary", elem_id="ask")
                        clear = gr.Button("New chat", elem_id="new-chat")
                    summary = gr.Markdown(elem_id="figures-line")
                with gr.Column(scale=2):
                    images = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images",
                                     height=150)
                    beams = gr.Slider(1, MAX_BEAMS, value=1, step=1, label="Beams", elem_id="beams",
                                      info="1: greedy, streams" if self.engine.beams else "greedy only over --api",
                                      interactive=self.engine.beams)
                    new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=self.max_new_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
                    with gr.Accordion("This request (JSON)", open=False):
                        figures = gr.JSON(label="Figures", elem_id="figures")
            gr.Markdown("## What the encoder kept")
            with gr.Row():
                grid = gr.Image(label="Final tokens on the image (after the resize policy)", type="pil", format="png",
                                interactive=False, elem_id="token-grid", scale=2, height=360)
                with gr.Column(scale=3):
                    costs = gr.Markdown(EMPTY_VIEW, elem_id="encoder-costs")
                    which = gr.Number(value=1, precision=0, minimum=1, label="Image shown (1 = first upload)",
                                      elem_id="which")
            gates = gr.Image(label="WTC gate weight per token (blue < 1/4 < red)", type="pil", format="png",
                             interactive=False, elem_id="gate-heatmap", height=340)
            with gr.Accordion("Numbers behind the pictures (JSON)", open=False):
                numbers = gr.JSON(label="Encoder view", elem_id="encoder-numbers")

            chat_io = dict(fn=self.chat, inputs=[images, question, beams, new_tokens, conversation],
                           outputs=[chatbot, figures, summary, conversation], concurrency_limit=self.chat_concurrency,
                           concurrency_id="chat")
            ask.click(api_name="chat", **chat_io).success(lambda: "", outputs=question, api_visibility="private")
            question.submit(api_visibility="private", **chat_io).success(lambda: "", outputs=question,
                                                                         api_visibility="private")
            clear.click(self.new_chat, outputs=[chatbot, figures, summary, conversation], api_name="new_chat")
            view_io = dict(fn=self.encoder_view, inputs=[images, which], outputs=[grid, gates, costs, numbers],
                           concurrency_limit=1, concurrency_id="encoder")
            images.change(api_name="encoder_view", **view_io)
            which.input(api_visibility="private", **view_io)
            images.change(self.new_chat, outputs=[chatbot, figures, summary, conversation], api_visibility="private")
        demo.queue(max_size=self.queue_size, default_concurrency_limit=1)
        return demo


def _history(conversation: Conversation, pending: str | None = None, partial: str = "") -> list[dict]:
    """Chat messages to show: each question (the first names its images), each answer; then the pending ones."""
    messages = []
    names = ", ".join(u.name for u in conversation.uploads)
    questions = conversation.questions() + ([pending] if pending is not None else [])
    answers = [t["content"] for t in conversation.turns if t["role"] == "assistant"] + [partial]
    for i, (asked, answer) in enumerate(zip(questions, answers)):
        shown = f"*[{len(conversation.uploads)} image(s): {names}]*\n\n{asked}" if i == 0 and names else asked
        messages += [{"role": "user", "content": shown}, {"role": "assistant", "content": answer}]
    return messages


def _whole(value: Any, name: str, low: int, high: int) -> int:
    """A whole number in [low, high] from what a client sent, or InputError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise InputError(f"{name}: expected a whole number from {low} to {high}, got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(f"{name}: {int(value)} is outside {low}..{high}")
    return int(value)


def _shown(message: str, title: str = "Cannot answer") -> gr.Error:
    """A message for the page (Gradio renders it as HTML: the user's file names are escaped)."""
    return gr.Error(html.escape(message), duration=None, title=title, print_exception=False)
