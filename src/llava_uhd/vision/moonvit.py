"""Kimi-VL MoonViT / released ViT-UHD checkpoint layout -> ViT-UHD (timm) names, and what it says about the
architecture.

A MoonViT folder (the paper's starting point, patch 14) and the release's ViT-UHD encoder folder (patch 10,
``merger`` modules after some blocks) share one layout: ``patch_embed.proj``, a (H, W, C) ``pos_emb`` table,
``encoder.blocks.N.{norm0,norm1,wqkv,wo,mlp.fc0,mlp.fc1}``, ``encoder.final_layernorm``. A block ``K``
(0-based) with ``merger.*`` keys runs a 2x2 compression after it: ``merger.attn_layer.0/.2`` are the
content-adaptive gate's two linears (``m_pooling``), absent for ``avg_pooling``; ``merger.zero_init_fc`` is
never used in the forward and is dropped.
"""

from __future__ import annotations

import re
from typing import Any

import torch

BLOCK_PREFIX = "encoder.blocks."
_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)$")
_RENAMES = {
    "norm0.": "norm1.",
    "norm1.": "norm2.",
    "wqkv.": "attn.qkv.",
    "wo.": "attn.proj.",
    "mlp.fc0.": "mlp.fc1.",
    "mlp.fc1.": "mlp.fc2.",
}
_MERGER_LINEARS = {"attn_layer.0.": "fc1.", "attn_layer.2.": "fc2."}
DROPPED_MERGER = ("zero_init_fc.",)
MERGING_METHODS = {"avg_pooling": "avg", "m_pooling": "content_adaptive"}
MOONVIT_OPTIONS = dict(rope="2d", norm_eps=1e-5, pos_embed_antialias=False, act_layer="gelu_tanh")
"""ViTUHDConfig fields of Kimi-VL's MoonViT beyond its shape: 2-D RoPE, LayerNorm eps 1e-5, a pos table
resampled without antialiasing, tanh GELU."""


def is_moonvit(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> bool:
    """A MoonViT-layout checkpoint: ``model_type: moonvit`` in its config or ``encoder.blocks.`` keys."""
    if config and config.get("model_type") == "moonvit":
        return True
    return any(k.startswith(BLOCK_PREFIX) for k in state) or "patch_embed.pos_emb.weight" in state


def from_moonvit(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], dict[int, str], list[str]]:
    """Rename a MoonViT-layout state dict to ViT-UHD names.

    Returns (mapped tensors, dropped file keys, {1-based WTC block: pooling kind}, unknown file keys kept
    under their own names so that the loader reports them as unexpected).
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    merger_keys: dict[int, set[str]] = {}
    for key, value in state.items():
        if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            out[key] = value
        elif key == "patch_embed.pos_emb.weight":
            if value.ndim != 3:
                raise ValueError(f"{key}: expected an (H, W, C) table, got shape {tuple(value.shape)}")
            out["pos_embed"] = value.reshape(1, value.shape[0] * value.shape[1], value.shape[2])
        elif key.startswith("encoder.final_layernorm."):
            out["norm." + key[len("encoder.final_layernorm.") :]] = value
        elif match := _BLOCK.match(key):
            index, rest = int(match.group(1)), match.group(2)
            if rest.startswith("merger."):
                rest = rest[len("merger.") :]
                merger_keys.setdefault(index, set()).add(rest)
                if rest.startswith(DROPPED_MERGER):
                    dropped.append(key)
                    continue
                for old, new in _MERGER_LINEARS.items():
                    if rest.startswith(old):
                        out[f"wtc.{index + 1}.{new}{rest[len(old):]}"] = value
                        break
                else:
                    unknown.append(key)
                    out[key] = value
                continue
            for old, new in _RENAMES.items():
                if rest.startswith(old):
                    out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                    break
            else:
                unknown.append(key)
                out[key] = value
        else:
            unknown.append(key)
            out[key] = value
    wtc = {
        index + 1: "content_adaptive" if any(k.startswith("attn_layer.") for k in keys) else "avg"
        for index, keys in sorted(merger_keys.items())
    }
    return out, sorted(dropped), wtc, sorted(unknown)


def moonvit_wtc_from_config(config: dict[str, Any] | None) -> dict[int, str]:
    """{1-based WTC block: pooling} from a release config's ``merger_layer_index`` (0-based) and
    ``merging_method``; used only when the weights carry no ``merger`` keys."""
    if not config or not config.get("merger_layer_index"):
        return {}
    method = config.get("merging_method", "m_pooling")
    if method not in MERGING_METHODS:
        raise ValueError(f"config.json merging_method: unknown {method!r}; expected one of {sorted(MERGING_METHODS)}")
    return {int(i) + 1: MERGING_METHODS[method] for i in config["merger_layer_index"]}
