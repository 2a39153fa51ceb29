"""The contenders of ``bench ttft``: four vision encoders (GNE, SBE, ViT-UHD + mlp, ViT-UHD + merger) and the
LLM they feed, per shape (``so400m-qwen2-7b``, ``tiny``, ``base``), all with random weights.

The ViTs are shared between contenders (SBE wraps the GNE ViT, both ViT-UHD variants run the same ViT):
sharing weights changes no FLOP and no timing, and keeps a full-size run within one GPU's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from llava_uhd.llm import load_llm, tiny_qwen2_config
from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
from llava_uhd.projector import build_projector
from llava_uhd.vision.moonvit import MOONVIT_OPTIONS
from llava_uhd.vision.registry import create_vit_uhd
from llava_uhd.vision.slicing import SliceEncoder

SHAPES = ("so400m-qwen2-7b", "tiny", "base")


@dataclass(frozen=True)
class EncoderKind:
    key: str
    label: str
    vit: str
    """Which ViT: ``gne`` (patch 14, no WTC) or ``uhd`` (patch 10 + WTC)."""
    projector: str
    sliced: bool = False


ENCODERS = (
    EncoderKind("gne", "GNE (patch 14, merger)", "gne", "merger"),
    EncoderKind("sbe", "SBE (slices, merger)", "gne", "merger", sliced=True),
    EncoderKind("uhd", "ViT-UHD (mlp, 16x)", "uhd", "mlp"),
    EncoderKind("uhd_merger", "ViT-UHD + merger (64x)", "uhd", "merger"),
)
BY_KEY = {kind.key: kind for kind in ENCODERS}

BASE_VIT = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, pos_embed_grid=24, base_patch_size=14)
BASE_WTC = (2, 8)
SLICES = {"tiny": (112, 6), "base": (336, 9), "so400m-qwen2-7b": (336, 9)}
"""SBE (slice size, max slices) per shape; tiny matches ``vit_sbe_tiny_patch14_siglip``."""
FAMILIES = ("siglip", "moonvit")


def llm_config(shape: str, vocab_size: int) -> dict:
    """LLM config dict for ``load_llm``; ``vocab_size`` applies to tiny and base (the 7B keeps Qwen2's 152064)."""
    if shape == "so400m-qwen2-7b":
        return tiny_qwen2_config(152064, hidden_size=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944,
                                 tie_word_embeddings=False, max_position_embeddings=32768)
    if shape == "base":
        return tiny_qwen2_config(vocab_size, hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864,
                                 tie_word_embeddings=True, max_position_embeddings=32768)
    if shape == "tiny":
        return tiny_qwen2_config(vocab_size, max_position_embeddings=32768)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def build_vits(shape: str, family: str = "siglip") -> dict[str, nn.Module]:
    """The two ViTs of a shape (GNE and ViT-UHD) of ``family`` (``FAMILIES``), built on the current default
    device, random weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {FAMILIES}")
    if shape in ("so400m-qwen2-7b", "tiny"):
        size = "so400m" if shape == "so400m-qwen2-7b" else "tiny"
        names = {"gne": f"vit_gne_{size}_patch14_{family}", "uhd": f"vit_uhd_{size}_patch10_{family}"}
        return {key: timm.create_model(name) for key, name in names.items()}
    if shape == "base":
        options = MOONVIT_OPTIONS if family == "moonvit" else {}
        return {"gne": create_vit_uhd(BASE_VIT, patch_size=14, wtc_layers=(), **options),
                "uhd": create_vit_uhd(BASE_VIT, patch_size=10, wtc_layers=BASE_WTC, **options)}
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def build_encoders(shape: str, llm_width: int, family: str = "siglip") -> dict[str, tuple[nn.Module, nn.Module]]:
    """(encoder, projector) per encoder kind. The ViTs are shared: SBE wraps the GNE ViT, and both ViT-UHD
    variants run the same ViT (sharing weights changes no FLOP and no timing)."""
    vits = build_vits(shape, family)
    slice_size, max_slices = SLICES[shape]
    sbe = SliceEncoder(vits["gne"], slice_size=slice_size, max_slices=max_slices)
    out = {}
    for kind in ENCODERS:
        encoder = sbe if kind.sliced else vits[kind.vit]
        out[kind.key] = (encoder, build_projector(kind.projector, encoder.embed_dim, llm_width))
    return out


def build_models(shape: str, tokenizer, device: torch.device, dtype: torch.dtype = torch.float32,
                 family: str = "siglip") -> dict[str, LlavaUHD]:
    """One LlavaUHD per encoder kind around a shared LLM, on ``device`` in ``dtype`` (random weights)."""
    config = llm_config(shape, len(tokenizer))
    with torch.device(device):  # full-size shapes are built where they run, not first in host memory
        llm = load_llm(config).to(dtype).eval()
        encoders = build_encoders(shape, config["hidden_size"], family)
    models = {}
    for key, (encoder, projector) in encoders.items():
        cfg = LlavaUHDConfig(encoder=BY_KEY[key].label, projector=BY_KEY[key].projector, llm=config)
        model = LlavaUHD(cfg, encoder=encoder, projector=projector, llm=llm, tokenizer=tokenizer)
        models[key] = model.to(device, dtype).eval()
    return models


def compile_models(models: dict[str, LlavaUHD]) -> None:
    """``torch.compile`` each distinct ViT, projector and the LLM in place (``nn.Module.compile``)."""
    seen: set[int] = set()
    for model in models.values():
        encoder = getattr(model.encoder, "base", model.encoder)  # SBE wraps the GNE ViT
        for module in (encoder, model.projector, model.llm):
            if id(module) not in seen:
                seen.add(id(module))
                module.compile()
