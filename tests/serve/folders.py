"""Tiny servable model folders, written by the tests: a release-format folder and ``save_pretrained`` folders.

vLLM's CPU attention supports head sizes of 64 and more (not the 16 of the other tests' tiny Qwen2), so every
LLM here has head_dim 64: width 128, 2 heads, 1 KV head. ``initializer_range=0.2`` spreads the logits so that
greedy choices are not near-ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from llava_uhd.llm import llm_config_from
from llava_uhd.serve.tiny import HIDDEN, serving_llm_config, write_tiny_export
from llava_uhd.tokenizer import QWEN2_SPECIAL_TOKENS, build_tiny_tokenizer
from tests.release.conftest import WIDTH, moonvit_tensors


def write_serving_release(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A release-format folder (sharded safetensors, ``llava_qwen`` config, tokenizer without image tokens), the
    layout of tests/release/conftest.py's ``write_release`` with a head_dim-64 Qwen2."""
    out.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer(tokenizer_dir, special_tokens=QWEN2_SPECIAL_TOKENS)
    tokenizer.save_pretrained(out)
    rows = (len(tokenizer) // 64 + 1) * 64
    llm_dict = serving_llm_config(rows, tie_word_embeddings=False)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(llm_config_from(llm_dict))
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tensors.update({"model.mm_projector.proj.0.weight": torch.randn(HIDDEN, WIDTH, generator=g) * 0.05,
                    "model.mm_projector.proj.0.bias": torch.randn(HIDDEN, generator=g) * 0.02,
                    "model.mm_projector.proj.2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1,
                    "model.mm_projector.proj.2.bias": torch.randn(HIDDEN, generator=g) * 0.02})
    tensors.update({"model.vision_tower.vision_tower." + k: v
                    for k, v in moonvit_tensors(seed, zero_gates=False).items()})
    config = {**llm_dict, "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
              "mm_vision_tower": "checkpoints/moonvit-so-400m-4-18-se-hirope2d-p10", "mm_projector_type": "mlp",
              "mm_hidden_size": WIDTH, "mm_use_im_start_end": False, "mm_patch_merge_type": "flat",
              "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def write_serving_export(out: Path, tokenizer_dir: Path, **kwargs) -> Path:
    """A ``save_pretrained`` folder of a tiny model (see :func:`llava_uhd.serve.tiny.write_tiny_export`)."""
    return write_tiny_export(out, tokenizer_dir, **kwargs)
