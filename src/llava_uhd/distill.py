"""Stage 1's optional feature distillation (docs/design.md, "Stage-1 distillation").

Inserting WTC perturbs the pretrained ViT's features; pre-alignment can pull them back towards what the
uncompressed ViT computes. The teacher is a frozen copy of the encoder without WTC; its tokens are
average-pooled to each student grid, and the loss is the mean cosine distance between the two.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SettingsError
from .mllm import LlavaUHD


def build_teacher(model: LlavaUHD, encoder: str) -> nn.Module:
    """A frozen copy of ``model``'s encoder (timm name ``encoder``) without WTC: the uncompressed features."""
    cfg = getattr(model.encoder, "cfg", None)
    if cfg is None or not cfg.wtc_layers:
        raise SettingsError("model.distill_weight: distillation needs a ViT-UHD encoder with WTC layers")
    kwargs = {k: v for k, v in model.config.encoder_kwargs.items() if k != "pretrained_path"}
    teacher = timm.create_model(encoder, **{**kwargs, "wtc_layers": ()})
    teacher.load_state_dict(model.encoder.state_dict(), strict=False)
    teacher.requires_grad_(False).eval()
    return teacher


def distill_loss(teacher: nn.Module, model: LlavaUHD, student: Any, pixel_values: Any) -> torch.Tensor:
    """Cosine distance between the student's encoder tokens and the teacher's, average-pooled to the student
    grids (one 2x2 pooling per WTC)."""
    with torch.no_grad():
        out = teacher(model.encoder_input(pixel_values))
    factor = 2 ** len(model.encoder.cfg.wtc_layers)
    tokens = out.tokens.reshape(-1, out.tokens.shape[-1])
    pooled, start = [], 0
    for h, w in out.grids:
        grid = tokens[start : start + h * w].T.reshape(1, -1, h, w)
        pooled.append(F.avg_pool2d(grid, factor).flatten(2)[0].T)
        start += h * w
    target = torch.cat(pooled)
    ours = student.tokens.reshape(-1, student.tokens.shape[-1])
    return (1 - F.cosine_similarity(ours.float(), target.float(), dim=-1)).mean()


def distill_forward(
    model: LlavaUHD, teacher: nn.Module, batch: dict, pixel_values: Any, weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1's training loss with distillation: the model's parts called one by one (encoder, projector,
    splice, LLM) so that the encoder's tokens feed both the LM loss and, with ``weight``, the distillation
    term. ``pixel_values`` is None for a text-only batch (LM loss only)."""
    encoder_out = model.run_encoder(pixel_values) if pixel_values is not None else None
    visual = model.project(encoder_out) if pixel_values is not None else None
    embeds = model.splice(batch["input_ids"], visual, batch.get("image_sizes") or [])
    out = model.llm(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    use_cache=False)
    terms = {"lm_loss": out.loss}
    if pixel_values is None:
        return out.loss, terms
    terms["distill_loss"] = distill_loss(teacher, model, encoder_out, pixel_values)
    return out.loss + weight * terms["distill_loss"], terms
