"""ViT-UHD: a timm VisionTransformer with Progressive Visual Compression, encoding at native resolution.

LLaVA-UHD v3 (arXiv 2511.21150) turns a pretrained ViT (SigLIP-SO400M/14) into ViT-UHD by
refining the patch embedding (14 -> 10, PI-resize) and inserting 2x2 Windowed Token Compression after
chosen blocks (4 and 18 of 27 by default), so one output token covers 40x40 pixels.

The model subclasses timm's ``VisionTransformer``, so its parameter names are timm's and a timm SigLIP
checkpoint loads into it (``pretrained_path=``; see :mod:`llava_uhd.vision.weights`). It accepts a
same-size batch ``[B, 3, H, W]`` (dense) or a list of differently sized images, encoded *packed*: all
tokens in one ``[N, C]`` sequence, linear layers over the whole pack, attention per image, no padding and
no pack-wide mask. Tokens run window-major inside the encoder (see :func:`window_major_order`) and come
out row-major on each image's final grid.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pvc import POOLING_KINDS, WindowedTokenCompression, window_major_order
from .resize import SIGLIP_MEAN, SIGLIP_STD

POS_EMBED_INITS = ("random", "sincos")


@dataclass
class ViTUHDConfig:
    """Architecture of a ViT-UHD (or, with no WTC and the base patch, the GNE baseline)."""

    embed_dim: int = 1152
    """Token width C."""
    depth: int = 27
    """Number of transformer blocks."""
    num_heads: int = 16
    """Attention heads (head dim = embed_dim / num_heads)."""
    mlp_ratio: float = 3.7362
    """MLP hidden = int(embed_dim * mlp_ratio); 1152 * 3.7362 -> 4304 for SO400M."""
    act_layer: str = "gelu_tanh"
    """MLP activation as the base weights were trained (SigLIP: tanh GELU)."""
    base_patch_size: int = 14
    """Patch size of the pretrained kernel (what ``pretrained_path`` holds)."""
    patch_size: int = 10
    """Patch size after Refined Patch Embedding; equal to ``base_patch_size`` disables RPE."""
    pos_embed_grid: int = 27
    """Side of the learned absolute pos-embed grid (378 / 14 for SigLIP-SO400M/14 @378)."""
    pos_embed_init: str = "random"
    """Initial pos-embed when no weights are loaded: ``random`` (timm's, std 0.02) or ``sincos`` (2-D sine-cosine
    at unit scale, MAE-style; still learned). From scratch a random 0.02 pos-embed is drowned by the patch
    features and a small model is slow to learn where things are; the tiny models start from ``sincos``."""
    wtc_layers: tuple[int, ...] = (4, 18)
    """1-based block indices after which a 2x2 WTC runs."""
    wtc_pooling: str = "content_adaptive"
    """WTC pooling kind: avg | content_adaptive | pixel_unshuffle."""
    qkv_bias: bool = True
    """Bias in the qkv projection (SigLIP: yes)."""
    mean: tuple[float, float, float] = SIGLIP_MEAN
    """Pixel normalisation mean."""
    std: tuple[float, float, float] = SIGLIP_STD
    """Pixel normalisation std."""
    reduction: int = field(init=False)
    """Derived: pixels per output token side = patch_size * 2 ** len(wtc_layers)."""

    def __post_init__(self) -> None:
        self.wtc_layers = tuple(int(i) for i in self.wtc_layers)
        if self.wtc_pooling not in POOLING_KINDS:
            raise ValueError(f"wtc_pooling: unknown pooling {self.wtc_pooling!r}; choose one of {POOLING_KINDS}")
        bad = [i for i in self.wtc_layers if not 1 <= i <= self.depth]
        if bad:
            raise ValueError(
                f"wtc_layers: block indices {bad} are outside 1..{self.depth} (1-based, depth {self.depth})"
            )
        if list(self.wtc_layers) != sorted(set(self.wtc_layers)):
            raise ValueError(f"wtc_layers: must be strictly increasing, got {list(self.wtc_layers)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size <= 0 or self.base_patch_size <= 0:
            raise ValueError("patch sizes must be positive")
        if self.pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"pos_embed_init: unknown {self.pos_embed_init!r}; choose one of {POS_EMBED_INITS}")
        if self.pos_embed_init == "sincos" and self.embed_dim % 4:
            raise ValueError(f"pos_embed_init: sincos needs embed_dim divisible by 4, got {self.embed_dim}")
        self.reduction = self.patch_size * 2 ** len(self.wtc_layers)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


@dataclass
class EncoderOutput:
    """Encoder result: tokens [B, n, C] (dense) or [sum n_i, C] (packed), row-major per image."""

    tokens: torch.Tensor
    grids: list[tuple[int, int]]

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.grids]


def packed_attention(attn: nn.Module, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """timm ``Attention`` over a packed [N, C] sequence, attending within each image only.

    Images of equal length are batched into one SDPA call; no block-diagonal mask is ever built.
    """
    n_total = x.shape[0]
    qkv = attn.qkv(x).view(n_total, 3, attn.num_heads, attn.head_dim)
    chunks = qkv.split(lengths, dim=0)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for length, indices in by_length.items():
        group = torch.stack([chunks[i] for i in indices]).permute(2, 0, 3, 1, 4)  # 3, b, heads, n, hd
        q, k, v = group.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        o = o.transpose(1, 2).reshape(len(indices), length, attn.attn_dim)
        for slot, i in enumerate(indices):
            out[i] = o[slot]
    y = attn.norm(torch.cat(out, dim=0))
    if getattr(attn, "gate", None) is not None:
        y = y * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(y))


_PACKED_LENGTHS: ContextVar[list[int] | None] = ContextVar("packed_lengths", default=None)


class PackedAttention(Attention):
    """timm ``Attention`` (same parameters, same checkpoint keys) that attends within each image when the
    encoder runs a packed [N, C] sequence; a dense [B, N, C] call is timm's own forward."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        lengths = _PACKED_LENGTHS.get()
        if lengths is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return packed_attention(self, x, lengths)


def packed_block(block: Block, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """A timm ``Block`` over a packed sequence, called through ``block(...)`` so that module hooks (FSDP2's
    unshard, activation checkpointing) see it: per-token layers on the whole pack, attention per image.
    (Drop-path, when enabled, would drop per token here; ViT-UHD runs with drop_path_rate 0.)"""
    token = _PACKED_LENGTHS.set(lengths)
    try:
        return block(x)
    finally:
        _PACKED_LENGTHS.reset(token)


class ViTUHD(VisionTransformer):
    """Vision Transformer with Refined Patch Embedding and Windowed Token Compression."""

    def __init__(self, cfg: ViTUHDConfig | None = None, **kwargs: Any) -> None:
        cfg = cfg or ViTUHDConfig(**kwargs)
        super().__init__(
            img_size=cfg.pos_embed_grid * cfg.patch_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            class_token=False,
            no_embed_class=True,
            dynamic_img_size=True,
            act_layer=cfg.act_layer,
            attn_layer=PackedAttention,
        )
        self.cfg = cfg
        if cfg.pos_embed_init == "sincos":
            grid = [cfg.pos_embed_grid, cfg.pos_embed_grid]
            with torch.no_grad():
                sincos = build_sincos2d_pos_embed(grid, cfg.embed_dim, device=self.pos_embed.device)
                self.pos_embed.copy_(sincos.to(self.pos_embed.dtype).unsqueeze(0))
        self.wtc = nn.ModuleDict(
            {str(i): WindowedTokenCompression(cfg.embed_dim, cfg.wtc_pooling) for i in cfg.wtc_layers}
        )
        self.pretrained_cfg = {
            "input_size": (3, 384, 384),
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "mean": cfg.mean,
            "std": cfg.std,
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # -- geometry -----------------------------------------------------------------------------------------------
    @property
    def reduction(self) -> int:
        """Pixels per output-token side."""
        return self.cfg.reduction

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid entering the first block and after each WTC, for an input of ``height x width``."""
        if height % self.reduction or width % self.reduction or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of {self.reduction} "
                f"(patch {self.patch_size} x 2^{len(self.cfg.wtc_layers)} WTC steps); use ResolutionPolicy(multiple="
                f"{self.reduction})"
            )
        h, w = height // self.patch_size, width // self.patch_size
        grids = [(h, w)]
        for _ in self.cfg.wtc_layers:
            h, w = h // 2, w // 2
            grids.append((h, w))
        return grids

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Final (rows, cols) of output tokens for an input of ``height x width`` pixels."""
        return self.stage_grids(height, width)[-1]

    def num_tokens(self, height: int, width: int) -> int:
        h, w = self.output_grid(height, width)
        return h * w

    # -- embedding ----------------------------------------------------------------------------------------------
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Absolute pos-embed bicubic-resampled to ``grid`` and put in window-major order: [h*w, C].

        Cached per grid when no gradient can flow into it (inference, or a frozen pos-embed); recomputed
        otherwise so that training still updates the learned grid.
        """
        needs_grad = torch.is_grad_enabled() and self.pos_embed.requires_grad
        key = (grid, self.pos_embed._version, self.pos_embed.dtype, self.pos_embed.device)
        if not needs_grad and key in self._pos_cache:
            return self._pos_cache[key]
        g = self.cfg.pos_embed_grid
        pos = resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=[g, g], num_prefix_tokens=0)[0]
        order = window_major_order(grid[0], grid[1], len(self.cfg.wtc_layers))
        if len(self.cfg.wtc_layers):
            pos = pos[order.to(pos.device)]
        if not needs_grad:
            if len(self._pos_cache) > 64:
                self._pos_cache.clear()
            self._pos_cache[key] = pos.detach()
        return pos

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Same-size images [B, 3, H, W] -> window-major patch tokens with pos-embed [B, n, C]."""
        self.stage_grids(images.shape[-2], images.shape[-1])
        x = self.patch_embed.proj(images)  # B, C, h, w
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if len(self.cfg.wtc_layers):
            x = x[:, window_major_order(grid[0], grid[1], len(self.cfg.wtc_layers)).to(x.device)]
        x = self.patch_embed.norm(x) + self.pos_embed_for(grid)
        return self.norm_pre(self.pos_drop(x))

    # -- forward ------------------------------------------------------------------------------------------------
    def _run_blocks(self, x: torch.Tensor, lengths: list[int] | None) -> tuple[torch.Tensor, list[int] | None]:
        for index, block in enumerate(self.blocks, start=1):
            if lengths is None:
                x = checkpoint(block, x, use_reentrant=False) if self._ckpt() else block(x)
            else:
                x = (
                    checkpoint(packed_block, block, x, lengths, use_reentrant=False)
                    if self._ckpt()
                    else packed_block(block, x, lengths)
                )
            wtc = self.wtc[str(index)] if str(index) in self.wtc else None
            if wtc is not None:
                x = wtc(x)
                lengths = None if lengths is None else [n // 4 for n in lengths]
        return self.norm(x), lengths

    def _ckpt(self) -> bool:
        return self.grad_checkpointing and self.training and torch.is_grad_enabled()

    def forward_features(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return self.forward(x).tokens

    def forward(self, x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> EncoderOutput:
        """Encode a same-size batch [B, 3, H, W] densely, or a list of [3, Hi, Wi] images packed."""
        if isinstance(x, torch.Tensor):
            if x.ndim != 4:
                raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
            grid = self.output_grid(x.shape[-2], x.shape[-1])
            tokens, _ = self._run_blocks(self.embed(x), None)
            return EncoderOutput(tokens=tokens, grids=[grid] * x.shape[0])
        images = list(x)
        if not images:
            raise ValueError("no images to encode")
        grids = [self.output_grid(img.shape[-2], img.shape[-1]) for img in images]
        # Patch-embed same-size images together, then lay every image's tokens end to end.
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, img in enumerate(images):
            by_size[(img.shape[-2], img.shape[-1])].append(index)
        pieces: list[torch.Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            embedded = self.embed(torch.stack([images[i] for i in indices]))
            for slot, i in enumerate(indices):
                pieces[i] = embedded[slot]
        lengths = [p.shape[0] for p in pieces]
        tokens, _ = self._run_blocks(torch.cat(pieces, dim=0), lengths)
        return EncoderOutput(tokens=tokens, grids=grids)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x  # an encoder: no pooling head

    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = super().group_matcher(coarse)
        matcher["wtc"] = r"^wtc\.(\d+)"
        return matcher


# -- timm registry ----------------------------------------------------------------------------------------------
SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, pos_embed_grid=27, base_patch_size=14)
TINY = dict(embed_dim=64, depth=6, num_heads=2, mlp_ratio=4.0, pos_embed_grid=16, base_patch_size=14,
            pos_embed_init="sincos")
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "num_classes", "global_pool")


def create_vit_uhd(
    shape: dict[str, Any], pretrained: bool = False, pretrained_path: str | None = None, **kwargs: Any
) -> ViTUHD:
    """Build a ViTUHD from a shape preset plus overrides; optionally load base ViT weights (RPE at load)."""
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    cfg_fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    unknown = set(kwargs) - cfg_fields
    if unknown:
        raise TypeError(f"unknown ViT-UHD option(s) {sorted(unknown)}; valid: {sorted(cfg_fields)}")
    if pretrained and not pretrained_path:
        raise ValueError("pretrained=True needs pretrained_path= (a local .safetensors/.bin file): nothing is fetched")
    cfg = ViTUHDConfig(**{**shape, **kwargs})
    if device is not None:
        with torch.device(device):
            model = ViTUHD(cfg)
    else:
        model = ViTUHD(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if pretrained_path:
        from .weights import load_base_weights

        load_base_weights(model, pretrained_path)
    return model


@register_model
def vit_uhd_so400m_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """ViT-UHD on SigLIP-SO400M/14: RPE 14 -> 10, content-adaptive WTC after blocks 4 and 18 (16x)."""
    defaults = dict(patch_size=10, wtc_layers=(4, 18), wtc_pooling="content_adaptive")
    return create_vit_uhd(SO400M, pretrained, **{**defaults, **kwargs})


@register_model
def vit_gne_so400m_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Global native-resolution baseline: the same SO400M ViT at patch 14, no WTC (MoonViT-like)."""
    defaults = dict(patch_size=14, wtc_layers=())
    return create_vit_uhd(SO400M, pretrained, **{**defaults, **kwargs})


@register_model
def vit_uhd_tiny_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny ViT-UHD for tests and the demo: width 64, depth 6, 2 heads, WTC after blocks 2 and 4."""
    defaults = dict(patch_size=10, wtc_layers=(2, 4), wtc_pooling="content_adaptive")
    return create_vit_uhd(TINY, pretrained, **{**defaults, **kwargs})


@register_model
def vit_gne_tiny_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny global native-resolution baseline: patch 14, no WTC."""
    defaults = dict(patch_size=14, wtc_layers=())
    return create_vit_uhd(TINY, pretrained, **{**defaults, **kwargs})
