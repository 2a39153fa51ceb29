"""Answers for several benchmark rows at once, built on ``LlavaUHD``'s public methods.

``LlavaUHD.generate`` answers one prompt; a benchmark has thousands. :func:`generate_batch` preprocesses
each image with the model's policy, encodes all images in one packed encoder call, splices each row's
visual tokens into its own prompt embeddings, left-pads the rows and runs one ``transformers`` generate
with an attention mask (greedy or beam search, KV cache). One row per batch goes through
``LlavaUHD.generate`` itself, so ``--batch-size 1`` answers exactly as the model's own method does.

During training, validate and test score generated answers too: :func:`answer_samples` answers each sample of
a data-pipeline batch, and :class:`llava_uhd.metrics.GenerationScores` scores and logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image


@torch.inference_mode()
def generate_batch(
    model, images: Sequence[Image.Image], prompts: Sequence[str], max_new_tokens: int, num_beams: int
) -> list[str]:
    """One answer per (image, prompt) pair, in order."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    if len(prompts) == 1:
        return [model.generate(images[0], prompts[0], max_new_tokens=max_new_tokens, num_beams=num_beams).text]
    device = model.llm.device
    pixels = [model.preprocess(image).to(device) for image in images]
    sizes = [tuple(p.shape[-2:]) for p in pixels]
    visual = model.encode_images(pixels)
    counts = [model.num_image_tokens(h, w) for h, w in sizes]
    embeds = []
    for prompt, size, tokens in zip(prompts, sizes, torch.split(visual, counts)):
        ids = torch.tensor([model.build_prompt_ids(prompt, [size])], device=device)
        embeds.append(model.splice(ids, tokens, [size])[0])
    length = max(e.shape[0] for e in embeds)
    width = embeds[0].shape[-1]
    batch = embeds[0].new_zeros(len(embeds), length, width)
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=device)
    for row, e in enumerate(embeds):  # left padding: every prompt ends where generation starts
        batch[row, length - e.shape[0]:] = e
        mask[row, length - e.shape[0]:] = 1
    tokenizer = model.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = model.llm.generate(
        inputs_embeds=batch, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=False, use_cache=True, eos_token_id=eos, pad_token_id=pad if pad is not None else eos,
    )
    texts = []
    for ids in out.tolist():
        if eos in ids:
            ids = ids[: ids.index(eos)]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def images_per_sample(batch: dict) -> list[list[torch.Tensor]]:
    """The preprocessed images of each sample of a data-pipeline batch (``images_per_sample`` counts)."""
    pixels = batch.get("pixel_values")
    images = [] if pixels is None or len(pixels) == 0 or pixels[0].numel() == 0 else list(pixels)
    out, start = [], 0
    for n in batch.get("images_per_sample", [0] * len(batch.get("meta", []))):
        out.append(images[start : start + n])
        start += n
    return out


def answer_samples(model, batch: dict, max_new_tokens: int, num_beams: int) -> list[dict[str, Any]]:
    """One record per sample of a batch (``predict_step``'s output): the prompt is the conversation up to its
    first reply; the answer comes from ``LlavaUHD.generate`` with its timings."""
    from ..conversation import normalize_turns

    records = []
    images = images_per_sample(batch)
    keys = batch.get("keys") or [None] * len(images)
    for key, meta, sample_images in zip(keys, batch.get("meta", []), images):
        question = meta.get("question") or meta.get("prompt") or ""
        if not question and meta.get("conversations"):
            question = normalize_turns(meta["conversations"])[0]["content"]
        result = model.generate(sample_images, question, max_new_tokens=max_new_tokens, num_beams=num_beams)
        records.append({
            "key": key, "task": meta.get("task"), "prompt": question, "answer": result.text,
            "reference": meta.get("answer"), "encoder_ms": result.encoder_ms, "prefill_ms": result.prefill_ms,
            "ttft_ms": result.ttft_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
        })
    return records

