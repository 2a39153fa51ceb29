"""Loading encoder weights (timm, open_clip, Hugging Face SigLIP, Kimi-VL MoonViT / released ViT-UHD layouts)
into a ViT-UHD, and building the encoder a checkpoint describes (:func:`load_encoder`).

Checkpoints are untrusted input: ``.safetensors`` is read with safetensors, ``.bin``/``.pt``/``.pth`` only
with ``torch.load(weights_only=True)``. A folder holds ``config.json`` plus ``model.safetensors``, shards
listed in ``model.safetensors.index.json``, or ``pytorch_model.bin``. RPE (PI-resize of the patch kernel)
and pos-embed resampling are applied here, once, in fp32. Missing, unexpected and dropped keys are reported
by name; a tensor whose shape cannot be adapted is a clear error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from .moonvit import from_moonvit, is_moonvit, moonvit_wtc_from_config
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
    dropped: list[str] = field(default_factory=list)
    """File tensors left out on purpose (MoonViT ``merger.zero_init_fc``: never used in its forward)."""
    format: str = ""
    """Detected layout: timm | open_clip | hf_siglip | moonvit."""
    source: str = ""
    """Where the weights came from (path, or ``state dict``)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling arbitrary objects (a ``*.index.json`` reads its shards)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith(".index.json"):
        return read_sharded(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"unsupported weights format {path.suffix!r} for {path}: use .safetensors or .bin")
    except ValueError:
        raise
    except Exception as err:  # corrupt, truncated, or a pickle that weights_only refuses
        raise ValueError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat mapping of tensor names to tensors")
    if not state:
        raise ValueError(f"{path} holds no tensors")
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_sharded(index_path: str | Path) -> dict[str, torch.Tensor]:
    """Read every shard an ``*.index.json`` (``weight_map``: tensor name -> shard file) names."""
    index_path = Path(index_path)
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' of tensor names to shard files")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / str(shard)
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {index_path} not found")
        state.update(read_state_dict(shard_path))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise ValueError(f"{index_path}: tensors listed but not in their shards: {', '.join(absent[:10])}")
    return state


WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, config.json or None) of a checkpoint folder or a single weights file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    if path.is_file():
        return read_state_dict(path), None
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return read_state_dict(path / name), config
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return read_state_dict(singles[0]), config
    raise FileNotFoundError(f"no encoder weights in folder {path}: expected one of {', '.join(WEIGHT_FILES)}")


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


def detect_format(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> str:
    """timm | open_clip | hf_siglip | moonvit, from the tensor names (and a config's ``model_type``)."""
    if is_moonvit(state, config):
        return "moonvit"
    if any(k.startswith("visual.trunk.") for k in state):
        return "open_clip"
    if any(k.startswith("vision_model.") for k in state) or "embeddings.patch_embedding.weight" in state:
        return "hf_siglip"
    return "timm"


@dataclass
class Checkpoint:
    """Encoder tensors under ViT-UHD names, with what the file's layout says about the architecture."""

    state: dict[str, torch.Tensor]
    format: str
    source: str
    config: dict[str, Any] | None = None
    dropped: list[str] = field(default_factory=list)
    """File tensors left out on purpose (named in the LoadReport)."""
    wtc: dict[int, str] = field(default_factory=dict)
    """{1-based block: pooling kind} of the WTC modules the checkpoint carries (empty: none)."""


_OWN_WTC = re.compile(r"^wtc\.(\d+)\.")


def _own_wtc(state: dict[str, torch.Tensor]) -> dict[int, str]:
    """WTC modules saved under our own names: content-adaptive (fc1 over [x; mean]) or pixel-unshuffle (norm)."""
    found: dict[int, str] = {}
    for key in state:
        if match := _OWN_WTC.match(key):
            index = int(match.group(1))
            kind = "pixel_unshuffle" if f"wtc.{index}.norm.weight" in state else "content_adaptive"
            found[index] = kind
    return dict(sorted(found.items()))


def normalise_state(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, source: str | Path = "state dict"
) -> Checkpoint:
    """Detect the layout and rename every tensor to ViT-UHD (timm) names."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    fmt = detect_format(state, config)
    if fmt == "moonvit":
        mapped, dropped, wtc, _ = from_moonvit(state)
        return Checkpoint(mapped, fmt, str(source), config, dropped, wtc or moonvit_wtc_from_config(config))
    mapped = to_timm_layout(state)
    return Checkpoint(mapped, fmt, str(source), config, [], _own_wtc(mapped))


def checkpoint_wtc(ckpt: Checkpoint) -> dict[str, Any]:
    """``wtc_layers`` / ``wtc_pooling`` the checkpoint's own WTC modules imply (empty when it has none)."""
    if not ckpt.wtc:
        return {}
    kinds = sorted(set(ckpt.wtc.values()))
    if len(kinds) > 1:
        raise ValueError(f"{ckpt.source}: WTC blocks mix pooling kinds {ckpt.wtc}; one kind per encoder is supported")
    return {"wtc_layers": tuple(ckpt.wtc), "wtc_pooling": kinds[0]}


def load_state(model: torch.nn.Module, ckpt: Checkpoint) -> LoadReport:
    """Load normalised tensors into ``model`` (a ViTUHD), applying RPE and pos-embed resampling."""
    state = dict(ckpt.state)
    path = ckpt.source
    report = LoadReport(dropped=list(ckpt.dropped), format=ckpt.format, source=ckpt.source)
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
        state["pos_embed"] = resample_abs_pos_embed(
            pos.float(), grid, [side, side], num_prefix_tokens=0, antialias=cfg.pos_embed_antialias
        ).to(pos.dtype)
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
    log.info(
        "loaded %s (%s layout): %d tensors, resampled %s", path, ckpt.format, len(usable), report.resampled or "none"
    )
    if report.missing:
        log.warning("weights missing from %s (left at init): %s", path, ", ".join(report.missing))
    if report.new_modules:
        log.info("new PVC parameters (not in the checkpoint): %s", ", ".join(report.new_modules))
    if report.dropped:
        log.info("tensors dropped on purpose (unused in the forward): %s", ", ".join(report.dropped))
    if ignored:
        log.info("unused base-model tensors (pooling head/classifier): %s", ", ".join(ignored))
    if other:
        log.warning("unexpected tensors in %s (ignored): %s", path, ", ".join(other))
    model._pos_cache.clear()
    model.load_report = report
    return report


def load_base_weights(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Load a base ViT checkpoint (file or folder, any supported layout) into ``model``, a ViTUHD."""
    return load_state(model, normalise_state(*read_checkpoint(path), source=path))


# -- building the encoder a checkpoint describes -------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _config_value(config: dict[str, Any], *names: str) -> Any:
    """First of ``names`` in the config or its ``vision_config`` (HF SiglipConfig nests the tower's)."""
    for scope in (config, config.get("vision_config") or {}):
        for name in names:
            if scope.get(name) is not None:
                return scope[name]
    return None


def architecture_from_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    """ViTUHDConfig fields read off the tensors (width, depth, MLP, patch, pos table, WTC) and the config
    (heads; MoonViT options for that layout). A field the checkpoint cannot tell is left out."""
    from .vit_uhd import MOONVIT_OPTIONS, ViTUHDConfig

    state, config, src = ckpt.state, ckpt.config or {}, ckpt.source
    fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    if {"embed_dim", "depth", "num_heads"} <= set(config):  # our own saved encoder config
        return {k: v for k, v in config.items() if k in fields}
    kernel = state.get("patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"{src}: no square conv patch_embed.proj.weight: not a ViT encoder checkpoint")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"{src}: transformer blocks are missing or not numbered 0..N-1 (found {blocks[:5]}...)")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    pos = state.get("pos_embed")
    if fc1 is None or pos is None:
        raise ValueError(f"{src}: needs blocks.0.mlp.fc1.weight and a pos-embed table to tell the architecture")
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise ValueError(f"{src}: pos-embed of {pos.shape[1]} positions is not a square table")
    arch: dict[str, Any] = {
        "embed_dim": kernel.shape[0],
        "depth": len(blocks),
        "mlp_dim": fc1.shape[0],
        "base_patch_size": kernel.shape[-1],
        "patch_size": kernel.shape[-1],
        "pos_embed_grid": side,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "wtc_layers": (),
    }
    arch.update(checkpoint_wtc(ckpt))
    for names, key in ((("hidden_size",), "embed_dim"), (("num_hidden_layers",), "depth"),
                       (("intermediate_size",), "mlp_dim")):
        stated = _config_value(config, *names)
        if stated is not None and int(stated) != arch[key]:
            raise ValueError(f"{src}: config.json {names[0]}={stated} but the weights have {key} {arch[key]}")
    heads = _config_value(config, "num_attention_heads", "num_heads")
    if heads is not None:
        arch["num_heads"] = int(heads)
    if ckpt.format == "moonvit":
        arch.update(MOONVIT_OPTIONS)
    else:
        arch["norm_eps"] = float(_config_value(config, "layer_norm_eps") or 1e-6)
        arch["act_layer"] = "gelu_tanh"
    return arch


def _build_encoder(ckpt: Checkpoint, overrides: dict[str, Any]) -> torch.nn.Module:
    from .vit_uhd import ViTUHD, ViTUHDConfig, encoder_name

    fields = {f.name for f in dataclasses.fields(ViTUHDConfig) if f.init}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown encoder option(s) {unknown}; valid: {sorted(fields)}")
    arch = {**architecture_from_checkpoint(ckpt), **overrides}
    if "num_heads" not in arch:
        raise ValueError(
            f"{ckpt.source}: the number of attention heads cannot be read from the weights and no config.json "
            "gives num_attention_heads: pass num_heads=..."
        )
    model = ViTUHD(ViTUHDConfig(**arch))
    model.registry_name = encoder_name(model.cfg)
    load_state(model, ckpt)
    return model


def encoder_from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, **overrides: Any
) -> torch.nn.Module:
    """The ViTUHD that ``state`` (any supported layout, tensors in memory) describes, weights loaded.

    ``config``: the encoder's config.json as a dict (MoonViT / HF fields, or our own ``ViTUHDConfig.to_dict()``).
    ``overrides``: ViTUHDConfig fields, e.g. ``patch_size=10, wtc_layers=(4, 18)`` for RPE and fresh WTCs."""
    if not state:
        raise ValueError("encoder state dict is empty")
    return _build_encoder(normalise_state(state, config, source="state dict"), overrides)


def load_encoder(path: str | Path, **overrides: Any) -> torch.nn.Module:
    """The ViTUHD a checkpoint folder or file describes, its weights loaded (``model.load_report`` says how).

    Reads MoonViT / released ViT-UHD folders and timm, open_clip and HF SigLIP files; width, depth, MLP, patch,
    pos table and WTC blocks come from the tensors, heads from config.json (or ``num_heads=``)."""
    return _build_encoder(normalise_state(*read_checkpoint(path), source=path), overrides)
