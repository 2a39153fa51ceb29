"""Answers for several benchmark rows at once, built on ``LlavaUHD``'s public methods.

``LlavaUHD.generate`` answers one prompt; a benchmark has thousands. :func:`generate_batch` preprocesses
each image with the model's policy, encodes all images in one packed encoder call, splices each row's
visual tokens into its own prompt embeddings, left-pads the rows and runs one ``transformers`` generate
with an attention mask (greedy or beam search, KV cache). One row per batch goes through
``LlavaUHD.generate`` itself, so ``--batch-size 1`` answers exactly as the model's own method does.
"""

from __future__ import annotations

from collections.abc import Sequence

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
