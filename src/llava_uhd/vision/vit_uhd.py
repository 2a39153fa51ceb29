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

The released ViT-UHD is built on Kimi-VL's MoonViT instead: the same class with ``rope="2d"`` (see
:mod:`llava_uhd.vision.rope`), LayerNorm eps 1e-5 and a 64x64 pos table resampled without antialiasing
(the ``*_moonvit`` entries; :func:`llava_uhd.vision.load_encoder` reads its folders).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerNorm, resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pvc import POOLING_KINDS, WindowedTokenCompression, window_major_order
from .resize import SIGLIP_MEAN, SIGLIP_STD, ReleaseResolutionPolicy, ResolutionPolicy, make_policy
from .rope import ROPE_KINDS, apply_rope, rope_table

POS_EMBED_INITS = ("random", "sincos")
ATTN_IMPLS = ("auto", "varlen", "sdpa", "block_diagonal")
"""Packed attention kernels: ``auto`` (varlen where it runs, else sdpa), ``varlen`` (one
``torch.nn.attention.varlen.varlen_attn`` call over the pack: CUDA, fp16/bf16), ``sdpa`` (per-image SDPA, equal
lengths batched) and ``block_diagonal`` (one SDPA call with a pack-wide block-diagonal mask: the plain port many
codebases use; the benchmark baseline and test oracle, quadratic in the pack length)."""


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
    """1-based block indices after which a 2x2 WTC runs."""
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
        if list(self.wtc_layers) != sorted(set(self.wtc_layers)):
            raise ValueError(f"wtc_layers: must be strictly increasing, got {list(self.wtc_layers)}")
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


RopeTable = tuple[torch.Tensor, torch.Tensor]
"""(sin, cos) [N, head_dim] for the tokens of the current sequence, in their order (see ``rope.py``)."""



def varlen_unsupported(q: torch.Tensor, dropout_p: float = 0.0) -> str | None:
    """Why the varlen kernel cannot run on ``q`` [N, heads, head_dim] (None: it can)."""
    if not q.is_cuda:
        return f"needs CUDA tensors, got {q.device.type}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16, got {str(q.dtype).removeprefix('torch.')}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"needs head_dim a multiple of 8 up to 256, got {q.shape[-1]}"
    if dropout_p > 0:
        return f"has no attention dropout (attn_drop {dropout_p})"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"is not in this torch ({torch.__version__})"
    return None


def resolve_attn_impl(impl: str, q: torch.Tensor, dropout_p: float = 0.0) -> str:
    """The kernel ``impl`` runs on ``q``: ``auto`` picks varlen on CUDA fp16/bf16, per-image SDPA elsewhere.

    An explicit ``varlen`` where the kernel cannot run is an error rather than a silent fallback, so a benchmark
    or test that asks for it never measures something else."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl: unknown {impl!r}; choose one of {ATTN_IMPLS}")
    if impl not in ("auto", "varlen"):
        return impl
    reason = varlen_unsupported(q, dropout_p)
    if reason is None:
        return "varlen"
    if impl == "varlen":
        raise ValueError(f"attn_impl='varlen': torch's varlen attention {reason}; use attn_impl='auto' or 'sdpa'")
    return "sdpa"


def _per_image_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], dropout_p: float):
    """Attention within each image of a [N, heads, hd] pack; images of equal length share one SDPA call."""
    chunks = list(zip(q.split(lengths), k.split(lengths), v.split(lengths)))
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for indices in by_length.values():
        qg, kg, vg = (torch.stack([chunks[i][j] for i in indices]).transpose(1, 2) for j in range(3))  # b, h, n, hd
        o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout_p).transpose(1, 2)  # b, n, h, hd
        for slot, i in enumerate(indices):
            out[i] = o[slot]
    return torch.cat(out, dim=0)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """One flash-attention varlen call over the pack (cumulative sequence lengths, no padding, no mask)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    cu = cu.to(q.device, non_blocking=True)
    return varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths))


def block_diagonal_mask(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """[N, N] boolean mask, True where query and key belong to the same image of the pack."""
    image = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return image[:, None] == image[None, :]


def _block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], dropout_p: float):
    """One SDPA call over the whole pack with a block-diagonal mask (the baseline packing port)."""
    mask = block_diagonal_mask(lengths, q.device)
    qg, kg, vg = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # 1, h, N, hd
    return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p)[0].transpose(0, 1)


def packed_attention(
    attn: nn.Module, x: torch.Tensor, lengths: list[int], rope: RopeTable | None = None, impl: str = "auto"
) -> torch.Tensor:
    """timm ``Attention`` over a packed [N, C] sequence, attending within each image only.

    ``impl`` (see ``ATTN_IMPLS``) chooses the kernel: varlen or per-image SDPA never build a pack-wide mask.
    ``rope`` (sin, cos) [N, head_dim], one row per token of the pack, rotates q and k after their norms.
    """
    n_total = x.shape[0]
    q, k, v = attn.qkv(x).view(n_total, 3, attn.num_heads, attn.head_dim).unbind(1)  # each N, heads, hd
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        sin, cos = rope[0][:, None], rope[1][:, None]  # N, 1, head_dim: the same turn for every head
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    kind = resolve_attn_impl(impl, q, dropout_p)
    if kind == "varlen":
        o = _varlen(q, k, v, lengths)
    elif kind == "block_diagonal":
        o = _block_diagonal(q, k, v, lengths, dropout_p)
    else:
        o = _per_image_sdpa(q, k, v, lengths, dropout_p)
    y = attn.norm(o.reshape(n_total, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        y = y * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(y))


_PACKED_LENGTHS: ContextVar[list[int] | None] = ContextVar("packed_lengths", default=None)
_ROPE: ContextVar[RopeTable | None] = ContextVar("rope_table", default=None)
_ATTN_IMPL: ContextVar[str] = ContextVar("attn_impl", default="auto")


class PackedAttention(Attention):
    """timm ``Attention`` (same parameters, same checkpoint keys) that attends within each image when the
    encoder runs a packed [N, C] sequence; a dense [B, N, C] call is timm's own forward unless RoPE is on."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        lengths, rope = _PACKED_LENGTHS.get(), _ROPE.get()
        if lengths is not None:
            return packed_attention(self, x, lengths, rope, _ATTN_IMPL.get())
        if rope is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self._dense_rope(x, rope, attn_mask, is_causal)

    def _dense_rope(
        self, x: torch.Tensor, rope: RopeTable, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """timm's forward with q and k rotated after their norms (sin/cos [N, head_dim] broadcast over B, heads)."""
        batch, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        sin, cos = rope
        q = apply_rope(self.q_norm(q), sin, cos)
        k = apply_rope(self.k_norm(k), sin, cos)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        o = self.norm(o.transpose(1, 2).reshape(batch, n, self.attn_dim))
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


def packed_block(
    block: Block, x: torch.Tensor, lengths: list[int] | None, rope: RopeTable | None = None, impl: str = "auto"
) -> torch.Tensor:
    """A timm ``Block`` over a packed sequence (``lengths``) and/or with a RoPE table, called through
    ``block(...)`` so that module hooks (FSDP2's unshard, activation checkpointing) see it: per-token layers
    on the whole pack, attention per image (kernel ``impl``, see ``ATTN_IMPLS``). The context is set inside, so a
    checkpoint's recompute sees it too.
    (Drop-path, when enabled, would drop per token here; ViT-UHD runs with drop_path_rate 0.)"""
    token = _PACKED_LENGTHS.set(lengths)
    rope_token = _ROPE.set(rope)
    impl_token = _ATTN_IMPL.set(impl)
    try:
        return block(x)
    finally:
        _ATTN_IMPL.reset(impl_token)
        _ROPE.reset(rope_token)
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
        self._rope_cache: dict[tuple, RopeTable] = {}
        self.registry_name = encoder_name(cfg)
        """A timm name that, with ``**cfg.to_dict()``, rebuilds this architecture."""

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

    def token_counter(self, projector: nn.Module):  # -> ImageTokenCounter (lazy import: mllm imports this module)
        """A picklable ``(height, width) -> LLM tokens`` equal to :meth:`num_image_tokens`, for data workers."""
        from llava_uhd.mllm import ImageTokenCounter

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
        """RoPE (sin, cos) [h*w, head_dim] for ``grid`` in window-major order with ``levels`` WTC steps to come.

        Fixed (no parameters, no gradient), so always cached per (grid, levels, device), and built outside
        inference mode so that a table first made under ``torch.inference_mode`` can be saved for backward."""
        key = (grid, levels, device)
        table = self._rope_cache.get(key)
        if table is None:
            if len(self._rope_cache) > 256:
                self._rope_cache.clear()
            cfg = self.cfg
            with torch.inference_mode(False):  # a table first built for inference must serve training too
                table = rope_table(grid[0], grid[1], levels, cfg.head_dim, cfg.rope_theta, device=device)
            self._rope_cache[key] = table
        return table

    def _rope_at(self, grids: list[tuple[int, int]], level: int, device: torch.device) -> RopeTable | None:
        """The RoPE table of the whole sequence at compression ``level`` (0: patch grid), or None when off."""
        if self.cfg.rope == "none":
            return None
        levels = len(self.cfg.wtc_layers) - level
        tables = [self.rope_for((h >> level, w >> level), levels, device) for h, w in grids]
        if len(tables) == 1:
            return tables[0]
        return torch.cat([t[0] for t in tables]), torch.cat([t[1] for t in tables])

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
        level = 0
        rope = self._rope_at(grids, level, x.device)
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
            wtc = self.wtc[str(index)] if str(index) in self.wtc else None
            if wtc is not None:
                x = wtc(x)
                lengths = None if lengths is None else [n // 4 for n in lengths]
                level += 1
                rope = self._rope_at(grids, level, x.device)
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


# -- timm registry ----------------------------------------------------------------------------------------------
SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, pos_embed_grid=27, base_patch_size=14)
TINY = dict(embed_dim=64, depth=6, num_heads=2, mlp_ratio=4.0, pos_embed_grid=16, base_patch_size=14,
            pos_embed_init="sincos")
# Kimi-VL MoonViT: the SO400M shape with 2-D RoPE, LayerNorm eps 1e-5 and a 64x64 pos table resampled
# without antialiasing.
MOONVIT_OPTIONS = dict(rope="2d", norm_eps=1e-5, pos_embed_antialias=False, act_layer="gelu_tanh")
MOONVIT_SO400M = dict(SO400M, mlp_dim=4304, pos_embed_grid=64, **MOONVIT_OPTIONS)
MOONVIT_TINY = dict(TINY, **MOONVIT_OPTIONS)
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "num_classes", "global_pool")


def encoder_name(cfg: ViTUHDConfig) -> str:
    """A registered timm name for ``cfg``'s family (ViT-UHD or GNE, SigLIP or MoonViT flavour, size).

    ``timm.create_model(encoder_name(cfg), **cfg.to_dict())`` rebuilds exactly ``cfg``: every field is passed."""
    family = "uhd" if cfg.wtc_layers else "gne"
    size = "so400m" if (cfg.embed_dim, cfg.depth) == (1152, 27) else "tiny"
    patch = 10 if cfg.wtc_layers else 14
    flavour = "moonvit" if cfg.rope == "2d" else "siglip"
    return f"vit_{family}_{size}_patch{patch}_{flavour}"


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
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    cfg_fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    unknown = set(kwargs) - cfg_fields
    if unknown:
        raise TypeError(f"unknown ViT-UHD option(s) {sorted(unknown)}; valid: {sorted(cfg_fields)}")
    if pretrained and not pretrained_path:
        raise ValueError("pretrained=True needs pretrained_path= (a local file or folder): nothing is fetched")
    if pretrained_path is not None and not str(pretrained_path).strip():
        raise ValueError("pretrained_path is empty: give a local weights file or folder, or leave it out")
    defaults = dict(defaults or {})
    checkpoint_state = None
    if pretrained_path:
        from .weights import checkpoint_wtc, normalise_state, read_checkpoint

        checkpoint_state = normalise_state(*read_checkpoint(pretrained_path), source=pretrained_path)
        defaults.update(checkpoint_wtc(checkpoint_state))
    cfg = ViTUHDConfig(**{**shape, **defaults, **kwargs})
    if device is not None:
        with torch.device(device):
            model = ViTUHD(cfg)
    else:
        model = ViTUHD(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if checkpoint_state is not None:
        from .weights import load_state

        load_state(model, checkpoint_state)
    return model


def _registered(name: str, shape: dict[str, Any], defaults: dict[str, Any], pretrained: bool, **kwargs: Any) -> ViTUHD:
    model = create_vit_uhd(shape, pretrained, defaults=defaults, **kwargs)
    model.registry_name = name
    return model


@register_model
def vit_uhd_so400m_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """ViT-UHD on SigLIP-SO400M/14: RPE 14 -> 10, content-adaptive WTC after blocks 4 and 18 (16x)."""
    defaults = dict(patch_size=10, wtc_layers=(4, 18), wtc_pooling="content_adaptive")
    return _registered("vit_uhd_so400m_patch10_siglip", SO400M, defaults, pretrained, **kwargs)


@register_model
def vit_gne_so400m_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Global native-resolution baseline: the same SO400M ViT at patch 14, no WTC (MoonViT-like)."""
    defaults = dict(patch_size=14, wtc_layers=())
    return _registered("vit_gne_so400m_patch14_siglip", SO400M, defaults, pretrained, **kwargs)


@register_model
def vit_uhd_tiny_patch10_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny ViT-UHD for tests and the demo: width 64, depth 6, 2 heads, WTC after blocks 2 and 4."""
    defaults = dict(patch_size=10, wtc_layers=(2, 4), wtc_pooling="content_adaptive")
    return _registered("vit_uhd_tiny_patch10_siglip", TINY, defaults, pretrained, **kwargs)


@register_model
def vit_gne_tiny_patch14_siglip(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny global native-resolution baseline: patch 14, no WTC."""
    defaults = dict(patch_size=14, wtc_layers=())
    return _registered("vit_gne_tiny_patch14_siglip", TINY, defaults, pretrained, **kwargs)


@register_model
def vit_uhd_so400m_patch10_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """The released ViT-UHD: Kimi-VL MoonViT-SO400M (2-D RoPE) with RPE 14 -> 10 and content-adaptive WTC
    after blocks 4 and 18 (1-based). ``pretrained_path`` takes a MoonViT or release folder (or file)."""
    defaults = dict(patch_size=10, wtc_layers=(4, 18), wtc_pooling="content_adaptive")
    return _registered("vit_uhd_so400m_patch10_moonvit", MOONVIT_SO400M, defaults, pretrained, **kwargs)


@register_model
def vit_gne_so400m_patch14_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """MoonViT-SO400M itself at patch 14, no WTC: the GNE baseline as the paper ran it."""
    defaults = dict(patch_size=14, wtc_layers=())
    return _registered("vit_gne_so400m_patch14_moonvit", MOONVIT_SO400M, defaults, pretrained, **kwargs)


@register_model
def vit_uhd_tiny_patch10_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny MoonViT-flavoured ViT-UHD for tests: width 64, depth 6, 2 heads (head_dim 32), WTC after 2 and 4."""
    defaults = dict(patch_size=10, wtc_layers=(2, 4), wtc_pooling="content_adaptive")
    return _registered("vit_uhd_tiny_patch10_moonvit", MOONVIT_TINY, defaults, pretrained, **kwargs)


@register_model
def vit_gne_tiny_patch14_moonvit(pretrained: bool = False, **kwargs: Any) -> ViTUHD:
    """Tiny MoonViT-flavoured GNE baseline for tests: patch 14, no WTC."""
    defaults = dict(patch_size=14, wtc_layers=())
    return _registered("vit_gne_tiny_patch14_moonvit", MOONVIT_TINY, defaults, pretrained, **kwargs)
