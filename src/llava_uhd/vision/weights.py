"""Encoder weights in (timm, open_clip, Hugging Face SigLIP, Kimi-VL MoonViT / released ViT-UHD layouts), loaded
into a ViT-UHD. Building the encoder a checkpoint describes is the registry's job
(:func:`llava_uhd.vision.registry.load_encoder`), which reads checkpoints through this module.

Checkpoints are untrusted input. :func:`read_weights` is the one reader of weight files and folders (the release
loader uses it too): ``.safetensors`` through safetensors, ``.bin``/``.pt``/``.pth``/``.ckpt`` only through timm's
``load_state_dict`` with ``weights_only=True`` (or refused, where only safetensors are allowed). A folder holds
``config.json`` plus ``model.safetensors``, shards listed in an ``*.index.json``, or ``pytorch_model.bin``.

Layouts enter through key maps (:mod:`.hf_siglip`, :mod:`.moonvit`; open_clip's ``visual.trunk.`` prefix here),
then :func:`checkpoint_filter_fn`, timm's checkpoint-filter pattern, adapts the tensors to the model once, in
fp32: RPE (PI-resize of the patch kernel) and pos-embed resampling; timm's loader applies it. Missing,
unexpected and dropped keys are reported by name; a tensor whose shape cannot be adapted is a clear error
naming the key.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import load_pretrained
from timm.models import load_state_dict as timm_load_state_dict
from tqdm import tqdm

from .hf_siglip import from_hf_siglip, is_hf_siglip
from .moonvit import from_moonvit, is_moonvit, moonvit_wtc_from_config
from .pvc import refine_patch_embed

log = logging.getLogger(__name__)

# Parameters a pure encoder has no use for: the MAP pooling head and classifier of the base model.
IGNORED_PREFIXES = ("attn_pool.", "head.", "fc_norm.", "cls_token", "reg_token")
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
"""What a folder's weights may be called, in the order they are looked for (then a lone ``*.safetensors``)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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


# -- reading files ---------------------------------------------------------------------------------------------------
def read_json(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A JSON object from ``path``; unreadable or not an object is a ValueError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: not a readable JSON {what} ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_state_dict(path: str | Path, pickles: bool = True) -> dict[str, torch.Tensor]:
    """Tensors of one weights file (an ``*.index.json``: of the shards it lists), never unpickling objects.

    ``pickles=False`` refuses ``.bin``/``.pt`` files even with ``weights_only`` (the release loader's rule)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith(".index.json"):
        return read_weights(path, pickles)
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"unsupported weights format {path.suffix!r} for {path}: use .safetensors or .bin")
    if not pickles and path.suffix != ".safetensors":
        raise ValueError(f"{path}: pickled weights are never loaded; convert them to safetensors")
    try:  # safetensors for .safetensors, torch.load(weights_only=True) otherwise
        state = timm_load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle that weights_only refuses
        root = err.__cause__ or err  # timm re-raises torch's refusal: name torch's own error
        raise ValueError(f"cannot read weights file {path}: {type(root).__name__}: {root}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat mapping of tensor names to tensors")
    if not state:
        raise ValueError(f"{path} holds no tensors")
    return state


def shard_files(index_path: str | Path) -> list[Path]:
    """The shard files an ``*.index.json`` (``weight_map``: tensor name -> file) lists, each checked to exist."""
    index_path = Path(index_path)
    weight_map = read_json(index_path, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' of tensor names to shard files")
    files = [index_path.parent / str(name) for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index_path} lists shards that are not there: {', '.join(missing)}")
    return files


def read_sharded(index_path: str | Path, pickles: bool = True, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every shard an ``*.index.json`` names, merged; a tensor in two shards or in none is an error."""
    index_path = Path(index_path)
    listed = read_json(index_path, "index").get("weight_map") or {}
    state: dict[str, torch.Tensor] = {}
    for shard in tqdm(shard_files(index_path), desc="reading shards", unit="file", disable=not progress):
        part = read_state_dict(shard, pickles)
        twice = state.keys() & part.keys()
        if twice:
            raise ValueError(f"{shard}: tensors also in another shard: {', '.join(sorted(twice)[:5])}")
        state.update(part)
    absent = sorted(k for k in listed if k not in state)
    if absent:
        raise ValueError(f"{index_path}: tensors listed but not in their shards: {', '.join(absent[:10])}")
    return state


def weights_path(folder: str | Path, pickles: bool = True, kind: str = "encoder") -> Path:
    """The file holding a folder's weights (an index, for shards); none is a FileNotFoundError saying what to add."""
    folder = Path(folder)
    names = WEIGHT_FILES if pickles else tuple(n for n in WEIGHT_FILES if "safetensors" in n)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    singles = sorted(folder.glob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    pickled = [] if pickles else sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" * bool(
        pickled)
    raise FileNotFoundError(f"no {kind} weights in folder {folder}: expected one of {', '.join(names)}{hint}")


def read_weights(
    path: str | Path, pickles: bool = True, progress: bool = False, kind: str = "encoder"
) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, a shard index or a folder (see :func:`weights_path`)."""
    path = Path(path)
    if path.is_dir():
        path = weights_path(path, pickles, kind)
    if path.name.endswith(".index.json") and path.is_file():
        return read_sharded(path, pickles, progress)
    return read_state_dict(path, pickles)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors, config.json or None) of a checkpoint folder or a single weights file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder checkpoint not found: {path}")
    if path.is_file():
        return read_state_dict(path), None
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    return read_weights(path), config


# -- layouts ---------------------------------------------------------------------------------------------------------
def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DDP) or ``model.`` prefix that every key carries."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise timm, open_clip (``visual.trunk.``) and HF (``vision_model.``) layouts to timm names."""
    state = strip_wrappers(state)
    if any(k.startswith("visual.trunk.") for k in state):  # open_clip timm-backed tower
        return {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    if is_hf_siglip(state):
        return from_hf_siglip(state)
    return dict(state)


def detect_format(state: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> str:
    """timm | open_clip | hf_siglip | moonvit, from the tensor names (and a config's ``model_type``)."""
    if is_moonvit(state, config):
        return "moonvit"
    if any(k.startswith("visual.trunk.") for k in state):
        return "open_clip"
    if is_hf_siglip(state):
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


def own_wtc(state: dict[str, torch.Tensor]) -> dict[int, str]:
    """WTC modules saved under our own names: content-adaptive (fc1 over [x; mean]) or pixel-unshuffle (norm)."""
    found: dict[int, str] = {}
    for key in state:
        if match := _OWN_WTC.match(key):
            index = int(match.group(1))
            found[index] = "pixel_unshuffle" if f"wtc.{index}.norm.weight" in state else "content_adaptive"
    return dict(sorted(found.items()))


def normalise_state(
    state: dict[str, torch.Tensor], config: dict[str, Any] | None = None, source: str | Path = "state dict"
) -> Checkpoint:
    """Detect the layout and rename every tensor to ViT-UHD (timm) names (idempotent on timm names)."""
    state = strip_wrappers(state)
    fmt = detect_format(state, config)
    if fmt == "moonvit":
        mapped, dropped, wtc, _ = from_moonvit(state)
        return Checkpoint(mapped, fmt, str(source), config, dropped, wtc or moonvit_wtc_from_config(config))
    mapped = to_timm_layout(state)
    return Checkpoint(mapped, fmt, str(source), config, [], own_wtc(mapped))


def checkpoint_wtc(ckpt: Checkpoint) -> dict[str, Any]:
    """``wtc_layers`` / ``wtc_pooling`` the checkpoint's own WTC modules imply (empty when it has none)."""
    if not ckpt.wtc:
        return {}
    kinds = sorted(set(ckpt.wtc.values()))
    if len(kinds) > 1:
        raise ValueError(f"{ckpt.source}: WTC blocks mix pooling kinds {ckpt.wtc}; one kind per encoder is supported")
    return {"wtc_layers": tuple(ckpt.wtc), "wtc_pooling": kinds[0]}


# -- adapting and loading --------------------------------------------------------------------------------------------
def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, report: LoadReport | None = None
) -> dict[str, torch.Tensor]:
    """timm-style checkpoint filter for a ViTUHD: any supported layout -> the model's names, the patch kernel
    PI-resized to its patch (RPE), the pos table resampled to its grid (bicubic, antialiased as the config says).

    Tensors the model lacks are left out; ``report`` (when given) names them and every other adaptation. A tensor
    whose shape cannot be adapted is a ValueError naming the key and both shapes."""
    report = report if report is not None else LoadReport(source="state dict")
    ckpt = normalise_state(state_dict, source=report.source)
    report.format = report.format or ckpt.format
    report.dropped = sorted({*report.dropped, *ckpt.dropped})
    state, cfg = dict(ckpt.state), model.cfg
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
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in usable.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{report.source}: checkpoint does not match the model's shape:\n  " + "\n  ".join(wrong))
    absent = sorted(k for k in own if k not in usable)
    report.new_modules = [k for k in absent if k.startswith("wtc.")]
    report.missing = [k for k in absent if not k.startswith("wtc.")]
    return usable


def load_state(model: torch.nn.Module, ckpt: Checkpoint) -> LoadReport:
    """Load normalised tensors into ``model`` (a ViTUHD) with timm's loader and :func:`checkpoint_filter_fn`."""
    report = LoadReport(dropped=list(ckpt.dropped), format=ckpt.format, source=ckpt.source)
    pretrained_cfg = {"num_classes": model.num_classes, **getattr(model, "pretrained_cfg", {})}
    pretrained_cfg["state_dict"] = ckpt.state  # timm's in-memory source: the filter then adapts it to the model
    load_pretrained(model, pretrained_cfg, num_classes=model.num_classes,
                    filter_fn=partial(checkpoint_filter_fn, report=report), strict=False)
    ignored = [k for k in report.unexpected if k.startswith(IGNORED_PREFIXES)]
    other = [k for k in report.unexpected if not k.startswith(IGNORED_PREFIXES)]
    loaded = len(ckpt.state) - len(report.unexpected)
    log.info("loaded %s (%s layout): %d tensors, resampled %s", ckpt.source, ckpt.format, loaded,
             report.resampled or "none")
    if report.missing:
        log.warning("weights missing from %s (left at init): %s", ckpt.source, ", ".join(report.missing))
    if report.new_modules:
        log.info("new PVC parameters (not in the checkpoint): %s", ", ".join(report.new_modules))
    if report.dropped:
        log.info("tensors dropped on purpose (unused in the forward): %s", ", ".join(report.dropped))
    if ignored:
        log.info("unused base-model tensors (pooling head/classifier): %s", ", ".join(ignored))
    if other:
        log.warning("unexpected tensors in %s (ignored): %s", ckpt.source, ", ".join(other))
    model.load_report = report
    return report


def load_base_weights(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Load a base ViT checkpoint (file or folder, any supported layout) into ``model``, a ViTUHD."""
    return load_state(model, normalise_state(*read_checkpoint(path), source=path))

