"""Finding the Windowed Token Compression modules of a model, and reading FSDP2-sharded ones locally."""

from __future__ import annotations

import torch
from torch import nn

from llava_uhd.vision.pvc import WindowedTokenCompression


def find_wtc(module: nn.Module) -> list[tuple[str, WindowedTokenCompression]]:
    """Every WTC of ``module`` with its qualified name (e.g. ``model.encoder.wtc.2``), in model order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, WindowedTokenCompression)]


def layer_label(name: str) -> str:
    """Short label for logging: ``model.encoder.wtc.2`` -> ``block2`` (the WTC runs after 1-based block 2)."""
    return f"block{name.rsplit('.', 1)[-1]}" if ".wtc." in f".{name}" else name.replace(".", "_")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: gathers an FSDP2 ``DTensor`` (a collective: call on every rank)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_copy(wtc: WindowedTokenCompression) -> WindowedTokenCompression:
    """A plain, unsharded CPU copy of ``wtc`` (same weights in fp32): safe to call directly under FSDP2."""
    copy = WindowedTokenCompression(wtc.dim, wtc.pooling)
    state = {k: full_tensor(v).detach().float().cpu() for k, v in wtc.state_dict().items()}
    copy.load_state_dict(state)
    return copy
