"""Loading base ViT weights (timm, open_clip or Hugging Face SigLIP layouts) into a ViT-UHD.

Checkpoints are untrusted input: ``.safetensors`` is read with safetensors, ``.bin``/``.pt``/``.pth`` only
with ``torch.load(weights_only=True)``. RPE (PI-resize of the patch kernel) and pos-embed resampling are
applied here, once, in fp32. Missing and unexpected keys are reported by name; a tensor whose shape cannot
be adapted is a clear error naming the key.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from .pvc import refine_patch_embed

log = logging.getLogger(__name__)

# Parameters a pure encoder has no use for: the MAP pooling head and classifier of the base model.
IGNORED_PREFIXES = ("attn_pool.", "head.", "fc_norm.", "cls_token", "reg_token")


@dataclass
class LoadReport:
    """What happened when base weights were loaded."""

    missing: list[str] = field(default_factory=list)
    """Model parameters the file did not provide, beyond the new PVC modules."""
    new_modules: list[str] = field(default_factory=list)
    """PVC parameters (WTC) that no base checkpoint has: kept at their initialisation."""
    unexpected: list[str] = field(default_factory=list)
    """File tensors the model does not use (pooling head, text tower, ...)."""
    resampled: list[str] = field(default_factory=list)
    """Tensors adapted at load: patch kernel (RPE) or pos-embed grid."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported weights format {path.suffix!r} for {path}: use .safetensors or .bin")
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat mapping of tensor names to tensors")
    return state


_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "self_attn.out_proj": "attn.proj",
}


def _from_hf_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP vision tower names -> timm names (q/k/v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.patch_embedding.weight":
            out["patch_embed.proj.weight"] = value
        elif key == "embeddings.patch_embedding.bias":
            out["patch_embed.proj.bias"] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif key.startswith("post_layernorm."):
            out["norm." + key.split(".", 1)[1]] = value
        elif key.startswith("head."):
            out["attn_pool." + key.split(".", 1)[1]] = value
        elif match := _HF_LAYER.match(key):
            layer, rest = int(match.group(1)), match.group(2)
            proj = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if proj:
                qkv.setdefault((layer, proj.group(2)), {})[proj.group(1)] = value
                continue
            for old, new in _HF_RENAMES.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            out[f"blocks.{layer}.{rest}"] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer}: incomplete q/k/v {kind} tensors in the checkpoint")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise timm, open_clip (``visual.trunk.``) and HF (``vision_model.``) layouts to timm names."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if any(k.startswith("visual.trunk.") for k in state):  # open_clip timm-backed tower
        return {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    if any(k.startswith("vision_model.") for k in state):  # HF SiglipModel / SiglipVisionModel
        vision = {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
        return _from_hf_siglip(vision)
    if "embeddings.patch_embedding.weight" in state:
        return _from_hf_siglip(state)
    return dict(state)


def load_base_weights(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Load a base ViT checkpoint into ``model`` (a ViTUHD), applying RPE and pos-embed resampling."""
    state = to_timm_layout(read_state_dict(path))
    report = LoadReport()
    cfg = model.cfg
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-1] != cfg.patch_size:
        state["patch_embed.proj.weight"] = refine_patch_embed(kernel, cfg.patch_size)
        report.resampled.append(f"patch_embed.proj.weight: {kernel.shape[-1]} -> {cfg.patch_size} (PI-resize)")
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[1] != cfg.pos_embed_grid**2:
        side = int(round(pos.shape[1] ** 0.5))
        if side * side != pos.shape[1]:
            raise ValueError(f"pos_embed: {pos.shape[1]} positions is not a square grid (class token?)")
        grid = [cfg.pos_embed_grid, cfg.pos_embed_grid]
        state["pos_embed"] = resample_abs_pos_embed(pos.float(), grid, [side, side], num_prefix_tokens=0).to(pos.dtype)
        report.resampled.append(f"pos_embed: {side}x{side} -> {grid[0]}x{grid[1]} (bicubic)")

    own = model.state_dict()
    report.unexpected = sorted(k for k in state if k not in own)
    usable = {k: v for k, v in state.items() if k in own}
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in usable.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"{path}: checkpoint does not match the model's shape:\n  " + "\n  ".join(wrong))
    result = model.load_state_dict(usable, strict=False)
    report.new_modules = sorted(k for k in result.missing_keys if k.startswith("wtc."))
    report.missing = sorted(k for k in result.missing_keys if not k.startswith("wtc."))
    ignored = [k for k in report.unexpected if k.startswith(IGNORED_PREFIXES)]
    other = [k for k in report.unexpected if not k.startswith(IGNORED_PREFIXES)]
    log.info("loaded %s: %d tensors, resampled %s", path, len(usable), report.resampled or "none")
    if report.missing:
        log.warning("weights missing from %s (left at init): %s", path, ", ".join(report.missing))
    if report.new_modules:
        log.info("new PVC parameters (not in any base checkpoint): %s", ", ".join(report.new_modules))
    if ignored:
        log.info("unused base-model tensors (pooling head/classifier): %s", ", ".join(ignored))
    if other:
        log.warning("unexpected tensors in %s (ignored): %s", path, ", ".join(other))
    model._pos_cache.clear()
    model.load_report = report
    return report
