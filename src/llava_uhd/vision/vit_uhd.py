"""ViT-UHD: a timm VisionTransformer with Progressive Visual Compression, encoding at native resolution.

LLaVA-UHD v3 (arXiv 2511.21150) turns a pretrained ViT (SigLIP-SO400M/14) into ViT-UHD by
refining the patch embedding (14 -> 10, PI-resize) and inserting 2x2 Windowed Token Compression after
chosen blocks (4 and 18 of 27 by default), so one output token covers 40x40 pixels.

The model subclasses timm's ``VisionTransformer``, so its parameter names are timm's and a timm SigLIP
checkpoint loads into it (``pretrained_path=``; see :mod:`llava_uhd.vision.weights`). It accepts a
same-size batch ``[B, 3, H, W]`` (dense) or a list of differently sized images, encoded *packed*: all
tokens in one ``[N, C]`` sequence, linear layers over the whole pack, attention per image
(:mod:`llava_uhd.vision.attention`), no padding and no pack-wide mask. Tokens run window-major inside the
encoder (see :func:`window_major_order`) and come out row-major on each image's final grid.

The released ViT-UHD is built on Kimi-VL's MoonViT instead: the same class with ``rope="2d"`` (see
:mod:`llava_uhd.vision.rope`), LayerNorm eps 1e-5 and a 64x64 pos table resampled without antialiasing.
The timm names (``vit_uhd_*``, ``vit_gne_*``) are registered in :mod:`llava_uhd.vision.registry`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from timm.layers import LayerNorm, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_uhd.tokens import ImageTokenCounter

from .attention import ATTN_IMPLS, PackedAttention, RopeTable, packed_block
from .pvc import POOLING_KINDS, WindowedTokenCompression, window_major_order
from .resize import SIGLIP_MEAN, SIGLIP_STD, ReleaseResolutionPolicy, ResolutionPolicy, make_policy
from .rope import ROPE_KINDS, RopeTables

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
    mlp_dim: int = 0
    """Explicit MLP hidden width (0: use ``mlp_ratio``); what a loader reads off a checkpoint's fc1."""
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
    """1-based block indices after which a 2x2 WTC runs; an index given twice runs two WTC steps there (``(6, 6)``
    on a 6-block ViT: no compression inside it, the same 16x after its last block)."""
    wtc_pooling: str = "content_adaptive"
    """WTC pooling kind: avg | content_adaptive | pixel_unshuffle."""
    qkv_bias: bool = True
    """Bias in the qkv projection (SigLIP: yes)."""
    norm_eps: float = 1e-6
    """Epsilon of every LayerNorm (blocks and final norm): timm/SigLIP 1e-6, MoonViT 1e-5."""
    pos_embed_antialias: bool = True
    """Antialias when the pos-embed table is bicubic-resampled to a smaller grid (timm: yes; MoonViT: no)."""
    rope: str = "none"
    """Rotary position embedding on q and k in every block: ``none`` or ``2d`` (MoonViT's, see ``rope.py``)."""
    rope_theta: float = 10000.0
    """Base of the RoPE frequencies ``theta ** (-4k / head_dim)``."""
    attn_impl: str = "auto"
    """Packed-path attention kernel: auto | varlen | sdpa | block_diagonal (``ATTN_IMPLS``); ``model.attn_impl``
    changes it at run time. No effect on weights or results beyond float rounding."""
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
        if list(self.wtc_layers) != sorted(self.wtc_layers):
            raise ValueError(f"wtc_layers: must be increasing (an index may repeat), got {list(self.wtc_layers)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: unknown {self.attn_impl!r}; choose one of {ATTN_IMPLS}")
        if self.rope not in ROPE_KINDS:
            raise ValueError(f"rope: unknown {self.rope!r}; choose one of {ROPE_KINDS}")
        if self.rope == "2d" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(
                f"rope: 2d RoPE needs head_dim divisible by 4, got {self.embed_dim // self.num_heads} "
                f"(embed_dim {self.embed_dim} / num_heads {self.num_heads})"
            )
        if self.mlp_dim < 0:
            raise ValueError(f"mlp_dim must be >= 0 (0: from mlp_ratio), got {self.mlp_dim}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if self.patch_size <= 0 or self.base_patch_size <= 0:
            raise ValueError("patch sizes must be positive")
        if self.pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"pos_embed_init: unknown {self.pos_embed_init!r}; choose one of {POS_EMBED_INITS}")
        if self.pos_embed_init == "sincos" and self.embed_dim % 4:
            raise ValueError(f"pos_embed_init: sincos needs embed_dim divisible by 4, got {self.embed_dim}")
        self.reduction = self.patch_size * 2 ** len(self.wtc_layers)

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width the blocks get."""
        return self.mlp_dim or int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid entering the first block and after each WTC, for an input of ``height x width`` pixels."""
        if height % self.reduction or width % self.reduction or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {height}x{width} must be a positive multiple of {self.reduction} "
                f"(patch {self.patch_size} x 2^{len(self.wtc_layers)} WTC steps); use ResolutionPolicy(multiple="
                f"{self.reduction})"
            )
        h, w = height // self.patch_size, width // self.patch_size
        grids = [(h, w)]
        for _ in self.wtc_layers:
            h, w = h // 2, w // 2
            grids.append((h, w))
        return grids

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def wtc_keys(layers: tuple[int, ...]) -> list[str]:
    """Module names of the WTC steps after ``layers`` (1-based blocks): ``"4"``; a second step after the same block
    ``"4_2"``."""
    seen: dict[int, int] = defaultdict(int)
    keys = []
    for index in layers:
        seen[index] += 1
        keys.append(str(index) if seen[index] == 1 else f"{index}_{seen[index]}")
    return keys


def encoder_name(cfg: ViTUHDConfig) -> str:
    """A registered timm name for ``cfg``'s family (ViT-UHD or GNE, SigLIP or MoonViT flavour, size).

    ``timm.create_model(encoder_name(cfg), **cfg.to_dict())`` rebuilds exactly ``cfg``: every field is passed."""
    family = "uhd" if cfg.wtc_layers else "gne"
    size = "so400m" if (cfg.embed_dim, cfg.depth) == (1152, 27) else "tiny"
    patch = 10 if cfg.wtc_layers else 14
    flavour = "moonvit" if cfg.rope == "2d" else "siglip"
    return f"vit_{family}_{size}_patch{patch}_{flavour}"


@dataclass
class EncoderOutput:
    """Encoder result: tokens [B, n, C] (dense) or [sum n_i, C] (packed), row-major per image."""

    tokens: torch.Tensor
    grids: list[tuple[int, int]]

    @property
    def lengths(self) -> list[int]:
        return [h * w for h, w in self.grids]


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
            mlp_ratio=(cfg.mlp_dim + 0.5) / cfg.embed_dim if cfg.mlp_dim else cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            norm_layer=partial(LayerNorm, eps=cfg.norm_eps),
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
            {key: WindowedTokenCompression(cfg.embed_dim, cfg.wtc_pooling) for key in wtc_keys(cfg.wtc_layers)}
        )
        self._wtc_after: dict[int, list[str]] = defaultdict(list)
        for index, key in zip(cfg.wtc_layers, self.wtc, strict=True):
            self._wtc_after[index].append(key)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.rope_tables = RopeTables(cfg.head_dim, cfg.rope_theta, len(cfg.wtc_layers))
        self.registry_name = encoder_name(cfg)
        """A timm name that, with ``**cfg.to_dict()``, rebuilds this architecture (the builder sets its own)."""

    # -- geometry -----------------------------------------------------------------------------------------------
    @property
    def reduction(self) -> int:
        """Pixels per output-token side."""
        return self.cfg.reduction

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def attn_impl(self) -> str:
        """Packed-path attention kernel (``ATTN_IMPLS``); settable at run time, e.g. ``model.attn_impl = "sdpa"``."""
        return self.cfg.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: unknown {impl!r}; choose one of {ATTN_IMPLS}")
        self.cfg.attn_impl = impl

    def stage_grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid entering the first block and after each WTC, for an input of ``height x width``."""
        return self.cfg.stage_grids(height, width)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Final (rows, cols) of output tokens for an input of ``height x width`` pixels."""
        return self.stage_grids(height, width)[-1]

    def num_tokens(self, height: int, width: int) -> int:
        h, w = self.output_grid(height, width)
        return h * w

    # -- token-count interface (shared by every encoder kind) ---------------------------------------------------
    def num_image_tokens(self, height: int, width: int, projector: nn.Module) -> int:
        """LLM positions a preprocessed ``height x width`` image takes after ``projector``."""
        gh, gw = projector.output_grid(*self.output_grid(height, width))
        return gh * gw

    def policy(
        self, projector: nn.Module, min_pixels: int = 512 * 512, max_pixels: int = 1560 * 1560, max_side: int = 5120,
        name: str = "default",
    ) -> ResolutionPolicy | ReleaseResolutionPolicy:
        """Resolution policy whose sides are a multiple of the pixels per LLM token (``name``: default | release)."""
        return make_policy(name, self.reduction * projector.merge, min_pixels, max_pixels, max_side)

    def token_counter(self, projector: nn.Module) -> ImageTokenCounter:
        """A picklable ``(height, width) -> LLM tokens`` equal to :meth:`num_image_tokens`, for data workers."""
        return ImageTokenCounter(self.reduction * projector.merge)

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
        pos = resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=[g, g],
            num_prefix_tokens=0,
            antialias=self.cfg.pos_embed_antialias,
        )[0]
        order = window_major_order(grid[0], grid[1], len(self.cfg.wtc_layers))
        if len(self.cfg.wtc_layers):
            pos = pos[order.to(pos.device)]
        if not needs_grad:
            if len(self._pos_cache) > 64:
                self._pos_cache.clear()
            self._pos_cache[key] = pos.detach()
        return pos

    def rope_for(self, grid: tuple[int, int], levels: int, device: torch.device) -> RopeTable:
        """RoPE (sin, cos) [h*w, head_dim] for ``grid`` in window-major order with ``levels`` WTC steps to come."""
        return self.rope_tables.table(grid, levels, device)

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
    def _run_blocks(
        self, x: torch.Tensor, lengths: list[int] | None, grids: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Blocks and WTCs over dense [B, n, C] (``lengths`` None, one patch grid) or a packed pack
        (one patch grid per image)."""
        level, rope_on = 0, self.cfg.rope != "none"
        rope = self.rope_tables.at(grids, level, x.device) if rope_on else None
        for index, block in enumerate(self.blocks, start=1):
            if lengths is None and rope is None:
                x = checkpoint(block, x, use_reentrant=False) if self._ckpt() else block(x)
            else:
                impl = self.cfg.attn_impl
                x = (
                    checkpoint(packed_block, block, x, lengths, rope, impl, use_reentrant=False)
                    if self._ckpt()
                    else packed_block(block, x, lengths, rope, impl)
                )
            for key in self._wtc_after.get(index, ()):
                x = self.wtc[key](x)
                lengths = None if lengths is None else [n // 4 for n in lengths]
                level += 1
                rope = self.rope_tables.at(grids, level, x.device) if rope_on else None
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
            patch_grid = self.stage_grids(x.shape[-2], x.shape[-1])[0]
            tokens, _ = self._run_blocks(self.embed(x), None, [patch_grid])
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
        patch_grids = [self.stage_grids(img.shape[-2], img.shape[-1])[0] for img in images]
        tokens, _ = self._run_blocks(torch.cat(pieces, dim=0), lengths, patch_grids)
        return EncoderOutput(tokens=tokens, grids=grids)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x  # an encoder: no pooling head

    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = super().group_matcher(coarse)
        matcher["wtc"] = r"^wtc\.(\d+)"
        return matcher

