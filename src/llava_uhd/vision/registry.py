"""timm registry entries for ViT-UHD and the global native-resolution (GNE) baseline.

Eight names, ``vit_{uhd,gne}_{so400m,tiny}_patch{10,14}_{siglip,moonvit}``, registered the way timm registers its
own models: ``generate_default_cfgs`` for their pretrained configs (no download location: nothing is fetched)
and ``build_model_with_cfg`` to build them. ``timm.create_model(name, pretrained_path=...)`` loads a local
file or folder in any supported layout (:mod:`llava_uhd.vision.weights`); a checkpoint that carries WTC
modules sets ``wtc_layers`` / ``wtc_pooling``, and explicit keyword arguments win over both.
:func:`load_encoder` / :func:`encoder_from_state_dict` build the encoder a checkpoint describes (architecture
read off its tensors and config).
"""

from __future__ import annotations

import dataclasses
import math
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .moonvit import MOONVIT_OPTIONS
from .resize import SIGLIP_MEAN, SIGLIP_STD
from .vit_uhd import ViTUHD, ViTUHDConfig, encoder_name
from .weights import Checkpoint, checkpoint_wtc, load_state, normalise_state, read_checkpoint

SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, pos_embed_grid=27, base_patch_size=14)
TINY = dict(embed_dim=64, depth=6, num_heads=2, mlp_ratio=4.0, pos_embed_grid=16, base_patch_size=14,
            pos_embed_init="sincos")
# Kimi-VL MoonViT: the SO400M shape with 2-D RoPE, LayerNorm eps 1e-5 and a 64x64 pos table resampled
# without antialiasing.
MOONVIT_SO400M = dict(SO400M, mlp_dim=4304, pos_embed_grid=64, **MOONVIT_OPTIONS)
MOONVIT_TINY = dict(TINY, **MOONVIT_OPTIONS)

TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "num_classes", "global_pool")
"""timm factory arguments accepted and passed to ``build_model_with_cfg``; those of a classifier are ignored."""
IGNORED_ARGS = ("features_only", "num_classes", "global_pool", "in_chans")
"""Filtered out before ``ViTUHD`` (an encoder: no head, no feature wrapper, RGB input)."""


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "input_size": (3, 384, 384),
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": SIGLIP_MEAN,
        "std": SIGLIP_STD,
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vit_uhd_so400m_patch10_siglip": _cfg(paper_ids="arXiv:2511.21150"),
    "vit_gne_so400m_patch14_siglip": _cfg(),
    "vit_uhd_tiny_patch10_siglip": _cfg(),
    "vit_gne_tiny_patch14_siglip": _cfg(),
    "vit_uhd_so400m_patch10_moonvit": _cfg(paper_ids="arXiv:2511.21150"),
    "vit_gne_so400m_patch14_moonvit": _cfg(),
    "vit_uhd_tiny_patch10_moonvit": _cfg(),
    "vit_gne_tiny_patch14_moonvit": _cfg(),
})


def build_vit_uhd(
    cfg: ViTUHDConfig,
    variant: str | None = None,
    checkpoint: Checkpoint | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **timm_kwargs: Any,
) -> ViTUHD:
    """``cfg`` as the timm model ``variant`` (default: :func:`encoder_name`), on ``device`` in ``dtype``, with
    ``checkpoint``'s tensors loaded (``model.load_report`` says how)."""
    variant = variant or encoder_name(cfg)
    overlay = {"mean": cfg.mean, "std": cfg.std, **(timm_kwargs.pop("pretrained_cfg_overlay", None) or {})}
    with torch.device(device) if device is not None else nullcontext():
        model = build_model_with_cfg(ViTUHD, variant, pretrained=False, model_cfg=cfg, pretrained_cfg_overlay=overlay,
                                     kwargs_filter=IGNORED_ARGS, **timm_kwargs)
    if dtype is not None:
        model = model.to(dtype)
    model.registry_name = variant
    if checkpoint is not None:
        load_state(model, checkpoint)
    return model


def _create_vit_uhd(
    variant: str | None, model_args: dict[str, Any], pretrained: bool = False, pretrained_path: str | None = None,
    **kwargs: Any,
) -> ViTUHD:
    """A registry entry's model: its ``model_args``, a checkpoint's WTC blocks, then explicit ``kwargs``."""
    fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    unknown = set(kwargs) - fields - {"device", "dtype", *TIMM_ARGS}
    if unknown:
        raise TypeError(f"unknown ViT-UHD option(s) {sorted(unknown)}; valid: {sorted(fields)}")
    if pretrained and not pretrained_path:
        raise ValueError("pretrained=True needs pretrained_path= (a local file or folder): nothing is fetched")
    if pretrained_path is not None and not str(pretrained_path).strip():
        raise ValueError("pretrained_path is empty: give a local weights file or folder, or leave it out")
    checkpoint = None
    if pretrained_path:
        checkpoint = normalise_state(*read_checkpoint(pretrained_path), source=pretrained_path)
        model_args = {**model_args, **checkpoint_wtc(checkpoint)}
    cfg = ViTUHDConfig(**{**model_args, **{k: kwargs.pop(k) for k in list(kwargs) if k in fields}})
    return build_vit_uhd(cfg, variant, checkpoint, **kwargs)


def create_vit_uhd(
    shape: dict[str, Any],
    pretrained: bool = False,
    pretrained_path: str | None = None,
    defaults: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ViTUHD:
    """Build a ViTUHD from a shape preset, the model's ``defaults`` and explicit overrides; optionally load
    weights from a local file or folder (RPE and pos-embed resampling at load).

    A checkpoint that carries WTC modules (a ViT-UHD release folder's ``merger`` keys, our own ``wtc.*``)
    sets ``wtc_layers`` / ``wtc_pooling`` over ``defaults``; explicit ``kwargs`` win over both."""
    return _create_vit_uhd(None, {**shape, **(defaults or {})}, pretrained, pretrained_path, **kwargs)


UHD_SO400M = dict(patch_size=10, wtc_layers=(4, 18), wtc_pooling="content_adaptive")
UHD_TINY = dict(patch_size=10, wtc_layers=(2, 4), wtc_pooling="content_adaptive")
GNE = dict(patch_size=14, wtc_layers=())


@register_model
def vit_uhd_so400m_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """ViT-UHD on SigLIP-SO400M/14: RPE 14 -> 10, content-adaptive WTC after blocks 4 and 18 (16x)."""
    return _create_vit_uhd("vit_uhd_so400m_patch10_siglip", dict(SO400M, **UHD_SO400M), pretrained, **kwargs)


@register_model
def vit_gne_so400m_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Global native-resolution baseline: the same SO400M ViT at patch 14, no WTC (MoonViT-like)."""
    return _create_vit_uhd("vit_gne_so400m_patch14_siglip", dict(SO400M, **GNE), pretrained, **kwargs)


@register_model
def vit_uhd_tiny_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny ViT-UHD for tests and the demo: width 64, depth 6, 2 heads, WTC after blocks 2 and 4."""
    return _create_vit_uhd("vit_uhd_tiny_patch10_siglip", dict(TINY, **UHD_TINY), pretrained, **kwargs)


@register_model
def vit_gne_tiny_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny global native-resolution baseline: patch 14, no WTC."""
    return _create_vit_uhd("vit_gne_tiny_patch14_siglip", dict(TINY, **GNE), pretrained, **kwargs)


@register_model
def vit_uhd_so400m_patch10_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """The released ViT-UHD: Kimi-VL MoonViT-SO400M (2-D RoPE) with RPE 14 -> 10 and content-adaptive WTC
    after blocks 4 and 18 (1-based). ``pretrained_path`` takes a MoonViT or release folder (or file)."""
    return _create_vit_uhd("vit_uhd_so400m_patch10_moonvit", dict(MOONVIT_SO400M, **UHD_SO400M), pretrained, **kwargs)


@register_model
def vit_gne_so400m_patch14_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """MoonViT-SO400M itself at patch 14, no WTC: the GNE baseline as the paper ran it."""
    return _create_vit_uhd("vit_gne_so400m_patch14_moonvit", dict(MOONVIT_SO400M, **GNE), pretrained, **kwargs)


@register_model
def vit_uhd_tiny_patch10_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny MoonViT-flavoured ViT-UHD for tests: width 64, depth 6, 2 heads (head_dim 32), WTC after 2 and 4."""
    return _create_vit_uhd("vit_uhd_tiny_patch10_moonvit", dict(MOONVIT_TINY, **UHD_TINY), pretrained, **kwargs)


@register_model
def vit_gne_tiny_patch14_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny MoonViT-flavoured GNE baseline for tests: patch 14, no WTC."""
    return _create_vit_uhd("vit_gne_tiny_patch14_moonvit", dict(MOONVIT_TINY, **GNE), pretrained, **kwargs)


# -- building the encoder a checkpoint describes -------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _config_value(config: dict[str, Any], *names: str) -> Any:
    """First of ``names`` in the config or its ``vision_config`` (HF SiglipConfig nests the tower's)."""
    for scope in (config, config.get("vision_config") or {}):
        for name in names:
            if scope.get(name) is not None:
                return scope[name]
    return None


def architecture_from_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """ViTUHDConfig fields read off the tensors (width, depth, MLP, patch, pos table, WTC) and the config
    (heads; MoonViT options for that layout). A field the checkpoint cannot tell is left out."""
    state, config, src = ckpt.state, ckpt.config or {}, ckpt.source
    fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    if {"embed_dim", "depth", "num_heads"} <= set(config):  # our own saved encoder config
        return {k: v for k, v in config.items() if k in fields}
    kernel = state.get("patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"{src}: no square conv patch_embed.proj.weight: not a ViT encoder checkpoint")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"{src}: transformer blocks are missing or not numbered 0..N-1 (found {blocks[:5]}...)")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    pos = state.get("pos_embed")
    if fc1 is None or pos is None:
        raise ValueError(f"{src}: needs blocks.0.mlp.fc1.weight and a pos-embed table to tell the architecture")
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise ValueError(f"{src}: pos-embed of {pos.shape[1]} positions is not a square table")
    arch: dict[str, Any] = {
        "embed_dim": kernel.shape[0],
        "depth": len(blocks),
        "mlp_dim": fc1.shape[0],
        "base_patch_size": kernel.shape[-1],
        "patch_size": kernel.shape[-1],
        "pos_embed_grid": side,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "wtc_layers": (),
    }
    arch.update(checkpoint_wtc(ckpt))
    for names, key in ((("hidden_size",), "embed_dim"), (("num_hidden_layers",), "depth"),
                       (("intermediate_size",), "mlp_dim")):
        stated = _config_value(config, *names)
        if stated is not None and int(stated) != arch[key]:
            raise ValueError(f"{src}: config.json {names[0]}={stated} but the weights have {key} {arch[key]}")
    heads = _config_value(config, "num_attention_heads", "num_heads")
    if heads is not None:
        arch["num_heads"] = int(heads)
    if ckpt.format == "moonvit":
        arch.update(MOONVIT_OPTIONS)
    else:
        arch["norm_eps"] = float(_config_value(config, "layer_norm_eps") or 1e-6)
        arch["act_layer"] = "gelu_tanh"
    return arch


def _build_encoder(ckpt: Checkpoint, overrides: dict[str, Any]) -> torch.nn.Module:
    fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown encoder option(s) {unknown}; valid: {sorted(fields)}")
    arch = {**architecture_from_checkpoint(ckpt), **overrides}
    if "num_heads" not in arch:
        raise ValueError(
            f"{ckpt.source}: the number of attention heads cannot be read from the weights and no config.json "
            "gives num_attention_heads: pass num_heads=..."
        )
    return build_vit_uhd(ViTUHDConfig(**arch), checkpoint=ckpt)


def encoder_from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, **overrides: Any
) -> torch.nn.Module:
    """The ViTUHD that ``state`` (any supported layout, tensors in memory) describes, weights loaded.

    ``config``: the encoder's config.json as a dict (MoonViT / HF fields, or our own ``ViTUHDConfig.to_dict()``).
    ``overrides``: ViTUHDConfig fields, e.g. ``patch_size=10, wtc_layers=(4, 18)`` for RPE and fresh WTCs."""
    if not state:
        raise ValueError("encoder state dict is empty")
    return _build_encoder(normalise_state(state, config, source="state dict"), overrides)


def load_encoder(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """The ViTUHD a checkpoint folder or file describes, its weights loaded (``model.load_report`` says how).

    Reads MoonViT / released ViT-UHD folders and timm, open_clip and HF SigLIP files; width, depth, MLP, patch,
    pos table and WTC blocks come from the tensors, heads from config.json (or ``num_heads=``)."""
    return _build_encoder(normalise_state(*read_checkpoint(path), source=path), overrides)
