"""A tiny random model folder that vLLM's CPU backend can serve (for the benchmark and the tests).

vLLM's CPU attention takes head sizes of 64 and more, so the Qwen2 here is 128 wide with 2 heads (head_dim 64);
``initializer_range=0.2`` spreads the logits so greedy choices are not near-ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llava_uhd.llm import tiny_qwen2_config
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
from llava_uhd.tokenizer import build_tiny_tokenizer

HIDDEN = 128


def serving_llm_config(vocab: int, **overrides: Any) -> dict[str, Any]:
    """A tiny Qwen2 config with head_dim 64."""
    return tiny_qwen2_config(vocab, hidden_size=HIDDEN, layers=2, heads=2, kv_heads=1, initializer_range=0.2,
                             **overrides)


def write_tiny_export(out: Path, tokenizer_dir: Path, encoder: str = "vit_uhd_tiny_patch10_siglip",
                      projector: str = "mlp", seed: int = 0, **config: Any) -> Path:
    """A ``save_pretrained`` folder of a tiny model (random weights); images kept small (80-320 px side)."""
    build_tiny_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    defaults = dict(min_pixels=80 * 80, max_pixels=320 * 320)
    cfg = LlavaUHDConfig(encoder=encoder, projector=projector, llm=serving_llm_config(1024),
                         tokenizer=str(tokenizer_dir), **{**defaults, **config})
    LlavaUHD(cfg).eval().save_pretrained(out)
    return Path(out)
