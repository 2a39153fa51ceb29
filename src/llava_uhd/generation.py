"""Answering a prompt about images, timed: the loop behind ``LlavaUHD.generate``.

The measured quantities are the paper's: encoder time, LLM prefill time up to the first token's logits,
time to first token (TTFT: encoder + projector and splice + prefill) and decoding speed. CUDA work is
synchronised (:func:`llava_uhd.profiling.synchronize`) before every clock read, so GPU times are real.

The first token's time is read inside ``transformers`` generate by a logits processor that only looks at the
clock (:class:`StepClock`). transformers has no timing hook of its own: a streamer refuses beam search, a
stopping criterion would be the same trick under another name, and timing a separate ``max_new_tokens=1``
call would run the prefill twice and time a different call than the one that answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from llava_uhd.profiling import synchronize

log = logging.getLogger(__name__)

Images = Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor] | None


class GeneratingModel(Protocol):
    """What the loop needs of a model (:class:`llava_uhd.mllm.LlavaUHD`, which imports this module)."""

    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...

    def build_prompt_ids(self, prompt: str | list[dict], image_sizes: list[tuple[int, int]]) -> list[int]: ...

    def run_encoder(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> Any: ...

    def project(self, encoder_out: Any) -> torch.Tensor: ...

    def splice(self, input_ids: torch.Tensor, visual: torch.Tensor | None, sizes: list) -> torch.Tensor: ...


@dataclass
class GenerationResult:
    """Text and timings of one ``LlavaUHD.generate`` call."""

    text: str
    token_ids: list[int]
    encoder_ms: float
    """Vision encoder forward."""
    prefill_ms: float
    """LLM forward over the prompt embeddings, up to the first token's logits."""
    ttft_ms: float
    """Time to first token: encoder + projector and splice + prefill."""
    decode_tokens_per_s: float
    """Tokens after the first, per second of decoding (0 when only one token was produced)."""
    num_image_tokens: int
    num_prompt_tokens: int


class StepClock(LogitsProcessor):
    """Timestamps every decoding step (logits processors run right after each LLM forward); scores pass
    through unchanged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def tick(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(self.tick())
        return scores


def as_pixel_list(model: GeneratingModel, images: Images) -> list[torch.Tensor]:
    """One image, several or none -> a list of [3, H, W] (PIL images preprocessed; tensors as they are)."""
    if images is None:
        return []
    if isinstance(images, Image.Image) or (isinstance(images, torch.Tensor) and images.ndim == 3):
        images = [images]
    return [model.preprocess(im) if isinstance(im, Image.Image) else im for im in images]


def warn_past_trained_length(model: GeneratingModel, prompt_tokens: int, max_new_tokens: int) -> bool:
    """Log a warning (and return True) when prompt + ``max_new_tokens`` can run past the LLM's
    ``max_position_embeddings``: answers there are unreliable, yet nothing fails."""
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if not limit or prompt_tokens + max_new_tokens <= limit:
        return False
    log.warning("the prompt is %d tokens (image tokens included) and up to %d new tokens are asked for: %d in all, "
                "past the LLM's max_position_embeddings (%d); answers past that length are unreliable (use a "
                "smaller image or --max-new-tokens)", prompt_tokens, max_new_tokens, prompt_tokens + max_new_tokens,
                limit)
    return True


def generate(
    model: GeneratingModel, images: Images, prompt: str | list[dict], max_new_tokens: int = 64, num_beams: int = 1,
    use_cache: bool = True, **generate_kwargs: Any,
) -> GenerationResult:
    """See :meth:`llava_uhd.mllm.LlavaUHD.generate` (run under ``torch.no_grad`` there)."""
    pixels = as_pixel_list(model, images)
    device = model.llm.device
    sizes = [tuple(p.shape[-2:]) for p in pixels]
    ids = model.build_prompt_ids(prompt, sizes)
    warn_past_trained_length(model, len(ids), max_new_tokens)
    input_ids = torch.tensor([ids], device=device)
    clock = StepClock(device)
    start = encoded = clock.tick()
    visual = None
    if pixels:
        pixels = [p.to(device) for p in pixels]
        encoder_out = model.run_encoder(torch.stack(pixels) if len(set(sizes)) == 1 else pixels)
        encoded = clock.tick()
        visual = model.project(encoder_out)
    embeds = model.splice(input_ids, visual, sizes)
    spliced = clock.tick()
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    if use_cache:
        out = model.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            num_beams=num_beams, do_sample=False, use_cache=True, eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos, logits_processor=LogitsProcessorList([clock]),
            **generate_kwargs,
        )
        new_ids = out[0].tolist()  # prompt given as inputs_embeds only: generate returns just the new tokens
    else:
        if num_beams != 1:
            raise ValueError("the uncached reference path is greedy only (num_beams=1)")
        new_ids = greedy_uncached(model, embeds, max_new_tokens, eos, clock)
    end = clock.tick()
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos) + 1]
    while new_ids and pad is not None and pad != eos and new_ids[-1] == pad:
        new_ids.pop()
    first = clock.times[0] if clock.times else end
    decode_s = end - first
    return GenerationResult(
        text=model.tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        encoder_ms=(encoded - start) * 1e3,
        prefill_ms=(first - spliced) * 1e3,
        ttft_ms=(first - start) * 1e3,
        decode_tokens_per_s=(len(new_ids) - 1) / decode_s if len(new_ids) > 1 and decode_s > 0 else 0.0,
        num_image_tokens=0 if visual is None else visual.shape[0],
        num_prompt_tokens=len(ids),
    )


def greedy_uncached(
    model: GeneratingModel, embeds: torch.Tensor, max_new_tokens: int, eos: int, clock: StepClock
) -> list[int]:
    """Greedy decoding that re-reads the whole sequence every step: the reference the KV-cache path is tested
    against."""
    new_ids: list[int] = []
    table = model.llm.get_input_embeddings()
    for _ in range(max_new_tokens):
        logits = model.llm(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        clock(None, logits)
        token = logits.argmax(-1)
        new_ids.append(int(token))
        if new_ids[-1] == eos:
            break
        embeds = torch.cat([embeds, table(token)[:, None]], dim=1)
    return new_ids
