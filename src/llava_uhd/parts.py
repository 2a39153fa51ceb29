"""The trained parts of a :class:`~llava_uhd.mllm.LlavaUHD` and which part each parameter belongs to: what stages
freeze, what gets a learning rate, what a LoRA adapter folder stores (docs/design.md, "Stages, parts and freezing")."""

from __future__ import annotations

PARTS = ("patch_embed", "wtc", "vit", "projector", "llm")


def part_of(name: str) -> str:
    """Which part a parameter of :class:`LlavaUHD` (named as in ``named_parameters``) belongs to."""
    if name.startswith("llm."):
        return "llm"
    if name.startswith("projector."):
        return "projector"
    inner = name.split(".", 1)[1] if name.startswith("encoder.") else name
    inner = inner.removeprefix("base.")  # the slice-based encoder wraps a ViT
    if inner.startswith(("patch_embed.", "pos_embed")):
        return "patch_embed"
    if inner.startswith("wtc."):
        return "wtc"
    return "vit"
