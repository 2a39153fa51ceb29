"""Hugging Face transformers SigLIP vision tower layout -> ViT-UHD (timm) names.

timm's own checkpoint filter knows open_clip and timm layouts but not transformers' ``SiglipVisionModel``
(``vision_model.embeddings.*``, ``encoder.layers.N.self_attn.{q,k,v}_proj``, ``post_layernorm``, ``head``):
this is that key map, q / k / v fused into timm's ``qkv``. The MAP head lands under ``attn_pool.`` (unused by an
encoder, reported as such by the loader).
"""

from __future__ import annotations

import re

import torch

VISION_PREFIX = "vision_model."
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_RENAMES = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "self_attn.out_proj": "attn.proj",
}


def is_hf_siglip(state: dict[str, torch.Tensor]) -> bool:
    """A transformers SigLIP checkpoint: a whole ``SiglipModel`` / ``SiglipVisionModel``, or its bare tower."""
    return any(k.startswith(VISION_PREFIX) for k in state) or "embeddings.patch_embedding.weight" in state


def from_hf_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP names -> timm names (the text tower of a whole ``SiglipModel`` is left out)."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        state = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.patch_embedding.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "embeddings.patch_embedding.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif key.startswith("post_layernorm."):
            out["norm." + key.split(".", 1)[1]] = value
        elif key.startswith("head."):
            out["attn_pool." + key.split(".", 1)[1]] = value
        elif match := _LAYER.match(key):
            layer, rest = int(match.group(1)), match.group(2)
            if proj := _QKV.match(rest):
                qkv.setdefault((layer, proj.group(2)), {})[proj.group(1)] = value
                continue
            for old, new in _RENAMES.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            out[f"blocks.{layer}.{rest}"] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer}: incomplete q/k/v {kind} tensors in the checkpoint")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
