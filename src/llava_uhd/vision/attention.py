"""Attention over a *packed* sequence: the tokens of several differently sized images laid end to end in one
``[N, C]`` tensor, each attending only within its own image.

Three kernels (``ATTN_IMPLS``), equal up to float rounding: PyTorch's varlen flash attention (one call over the
pack, CUDA fp16/bf16), per-image SDPA (images of equal length batched together) and one SDPA call with a
pack-wide block-diagonal mask (the plain port many codebases use; kept as the benchmark baseline and the test
oracle). :class:`PackedAttention` is timm's ``Attention`` (same parameters and checkpoint names) that switches
to these kernels, and rotates q / k with a RoPE table, when :func:`packed_block` runs a block over a pack.
"""

from __future__ import annotations

from collections import defaultdict
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from .rope import apply_rope

ATTN_IMPLS = ("auto", "varlen", "sdpa", "block_diagonal")
"""Packed attention kernels: ``auto`` (varlen where it runs, else sdpa), ``varlen`` (one
``torch.nn.attention.varlen.varlen_attn`` call over the pack: CUDA, fp16/bf16), ``sdpa`` (per-image SDPA, equal
lengths batched) and ``block_diagonal`` (one SDPA call with a pack-wide block-diagonal mask: the plain port many
codebases use; the benchmark baseline and test oracle, quadratic in the pack length)."""

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
    image = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device),
                                    output_size=sum(lengths))  # known size: no device sync, runs on meta too
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
