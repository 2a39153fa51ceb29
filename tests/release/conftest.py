"""Tiny LLaVA-format release folders (the layout of the released LLaVA-UHD v3), written by the tests.

A release folder: Qwen2 ``config.json`` + LLaVA fields, weights sharded with ``model.safetensors.index.json``
(encoder in MoonViT names under ``model.vision_tower.vision_tower.``, the ``mlp`` projector as
``model.mm_projector.proj.0/.2``, the Qwen2 LM as ``model.*`` + ``lm_head.weight``), and a Qwen2-like tokenizer
without ``<|image_pad|>``. The encoder is a tiny MoonViT ViT-UHD: width 144 (two heads of MoonViT's width 72),
4 blocks, patch 10, a WTC after 0-based blocks 0 and 2 (40 px per token), an 8x8 pos-embed table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from llava_uhd.llm import llm_config_from, tiny_qwen2_config
from llava_uhd.tokenizer import QWEN2_SPECIAL_TOKENS, build_tiny_tokenizer

WIDTH, DEPTH, MLP, PATCH, GRID = 144, 4, 128, 10, 8
MERGER_BLOCKS = (0, 2)


def moonvit_tensors(seed: int = 0, zero_gates: bool = True) -> dict[str, torch.Tensor]:
    """Encoder tensors in MoonViT names; ``zero_gates``: every merger tensor zero, as the release ships them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    c = WIDTH
    state = {"patch_embed.proj.weight": rnd(c, 3, PATCH, PATCH, std=0.05), "patch_embed.proj.bias": rnd(c),
             "patch_embed.pos_emb.weight": rnd(GRID, GRID, c, std=0.5)}
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        for norm in ("norm0", "norm1"):
            state[b + norm + ".weight"] = 1 + rnd(c, std=0.1)
            state[b + norm + ".bias"] = rnd(c)
        state.update({b + "wqkv.weight": rnd(3 * c, c, std=0.1), b + "wqkv.bias": rnd(3 * c),
                      b + "wo.weight": rnd(c, c, std=0.05), b + "wo.bias": rnd(c),
                      b + "mlp.fc0.weight": rnd(MLP, c, std=0.05), b + "mlp.fc0.bias": rnd(MLP),
                      b + "mlp.fc1.weight": rnd(c, MLP, std=0.05), b + "mlp.fc1.bias": rnd(c)})
        if i in MERGER_BLOCKS:
            scale = 0.0 if zero_gates else 0.1
            m = b + "merger."
            state.update({m + "zero_init_fc.weight": torch.zeros(c, c),
                          m + "attn_layer.0.weight": rnd(c, 2 * c) * scale, m + "attn_layer.0.bias": rnd(c) * scale,
                          m + "attn_layer.2.weight": rnd(c, c) * scale, m + "attn_layer.2.bias": rnd(c) * scale})
    state["encoder.final_layernorm.weight"] = 1 + rnd(c, std=0.1)
    state["encoder.final_layernorm.bias"] = rnd(c)
    return state


def moonvit_config() -> dict:
    return {"model_type": "moonvit", "patch_size": PATCH, "init_pos_emb_height": GRID, "init_pos_emb_width": GRID,
            "hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": WIDTH // 72,
            "intermediate_size": MLP, "merger_layer_index": list(MERGER_BLOCKS), "merging_method": "m_pooling"}


def write_release(out: Path, tokenizer_dir: Path, sharded: bool = True, zero_gates: bool = True,
                  vocab_rows: int | None = None, encoder_folder: bool = False, extra: dict | None = None,
                  seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A tiny release folder at ``out``. ``vocab_rows``: LM embedding rows (default: the tokenizer's, padded to a
    multiple of 64 as Qwen2 pads); ``extra``: more tensors to store (to test that they are reported)."""
    out.mkdir(parents=True)
    tokenizer = build_tiny_tokenizer(tokenizer_dir, special_tokens=QWEN2_SPECIAL_TOKENS)
    tokenizer.save_pretrained(out)
    rows = vocab_rows or (len(tokenizer) // 64 + 1) * 64  # Qwen2 pads its vocabulary
    llm_dict = tiny_qwen2_config(rows, hidden_size=64, layers=2, heads=4, kv_heads=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(llm_config_from(llm_dict))
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    tensors.update({"model.mm_projector.proj.0.weight": torch.randn(64, WIDTH, generator=g) * 0.05,
                    "model.mm_projector.proj.0.bias": torch.randn(64, generator=g) * 0.02,
                    "model.mm_projector.proj.2.weight": torch.randn(64, 64, generator=g) * 0.1,
                    "model.mm_projector.proj.2.bias": torch.randn(64, generator=g) * 0.02})
    tensors.update({"model.vision_tower.vision_tower." + k: v for k, v in moonvit_tensors(seed, zero_gates).items()})
    tensors = {k: v.to(dtype) for k, v in tensors.items()}  # the release ships bfloat16
    tensors.update(extra or {})
    tower = "checkpoints/moonvit-so-400m-4-18-se-hirope2d-p10"  # the training machine's path: not here
    if encoder_folder:
        tower_dir = out.parent / f"{out.name}_encoder"
        tower_dir.mkdir()
        (tower_dir / "config.json").write_text(json.dumps(moonvit_config()))
        tower = str(tower_dir)
    config = {**llm_dict, "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
              "mm_vision_tower": tower, "mm_projector_type": "mlp", "mm_hidden_size": WIDTH,
              "mm_use_im_start_end": False, "mm_patch_merge_type": "flat",
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if not sharded:
        save_file(tensors, str(out / "model.safetensors"))
        return out
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen2_like_tokenizer")


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return write_release(tmp_path_factory.mktemp("release") / "llava-uhd-v3", tokenizer_dir)


@pytest.fixture(scope="session")
def release_model(release_dir):
    from llava_uhd.mllm import LlavaUHD

    return LlavaUHD.from_pretrained(release_dir).eval()
