"""The :class:`LlavaUHD` a training stage starts from, built from the stage's flat ``model.*`` settings.

Two ways in ("start from these weights" is not "resume this run": docs/design.md, "Stages, parts and
freezing"):

- ``llm`` empty and ``init_from`` a model folder (ours or the LLaVA-format release): the folder gives the whole
  model, architecture, weights and tokenizer (``configs/release.yaml``);
- ``llm`` a local LLM directory or a config dict (random weights and the project's tiny offline tokenizer): the
  model is built from ``encoder`` (a timm name plus overrides), ``projector`` and ``llm``; ``init_from`` (a
  previous stage's ``.ckpt`` or exported folder) then loads weights only.

Every mistake is a :class:`SettingsError` whose message starts with the ``model.<key>`` it blames, so the CLI
prints one line. The flat keys stay flat on purpose: an ablation is one override (``--model.wtc_pooling avg``).
"""

from __future__ import annotations

import difflib
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError
from timm.models import load_state_dict
from torch import nn

from .checkpoint_io import UNREADABLE, unreadable_checkpoint
from .errors import MissingFileError, SettingsError
from .llm import tiny_qwen2_config
from .lora import LoraSettings, apply_lora, as_lora_settings
from .mllm import WEIGHTS_NAME, LlavaUHD, LlavaUHDConfig
from .release import is_release_folder
from .tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)

ENCODER_OVERRIDES = ("patch_size", "wtc_layers", "wtc_pooling", "pos_embed_init")
"""Encoder settings passed to ``timm.create_model``; the encoder's config names them in its errors."""


@dataclass
class ModelSettings:
    """The stage module's model settings, each a flat ``model.<field>`` key of the training CLI.

    This is the one place they are declared: ``UHDModule`` takes them as ``**model_settings`` and the CLI reads
    their types and help from here.

    Args:
        encoder: timm name of the vision encoder (``vit_uhd_*``, ``vit_gne_*`` or ``vit_sbe_*``).
        encoder_weights: local base ViT weights (timm / open_clip / HF file); RPE is applied at load.
        patch_size: RPE patch size override.
        wtc_layers: 1-based blocks after which a 2x2 WTC runs (override).
        wtc_pooling: WTC pooling kind (override).
        pos_embed_init: pos-embed initialisation of a from-scratch encoder (override; tiny models: ``sincos``).
        projector: ``mlp`` (16x total: the released model's) or ``merger`` (64x total).
        llm: local causal-LM directory, or a config dict (random weights; tiny runs).
        tokenizer: tokenizer directory (default: the LLM's directory).
        llm_dtype: LLM weight dtype at load, e.g. ``bfloat16``.
        vision_markers: wrap image tokens in <|vision_start|>/<|vision_end|> in prompts.
        resize_policy: image resize rule, ``default`` (ours) or ``release`` (the released model's); None: the
            model folder's (``init_from`` with ``llm`` empty), else ``default``. Saved with the exported model.
        init_from: weights to start from (a previous stage's ``.ckpt`` or exported folder); not a resume.
            With ``llm`` empty: a model folder (ours or a release) giving architecture, weights and tokenizer.
        reinit_wtc_gate: after loading, re-initialise every content-adaptive WTC gate (W1 random, W2 and b2
            zero): exact average pooling with a live gradient. The release's gates are all zero and never train.
        zero_wtc_gate: after loading, set every parameter of every content-adaptive WTC gate to zero, as the
            released model's loader does: exact average pooling whose gradient is exactly zero, so it never trains
            (the ``prealign`` ablation's dead gate).
    """

    encoder: str = "vit_uhd_so400m_patch10_siglip"
    encoder_weights: str | None = None
    patch_size: int | None = None
    wtc_layers: list[int] | None = None
    wtc_pooling: Literal["avg", "content_adaptive", "pixel_unshuffle"] | None = None
    pos_embed_init: Literal["random", "sincos"] | None = None
    projector: Literal["mlp", "merger"] = "mlp"
    llm: str | dict[str, Any] = ""
    tokenizer: str | None = None
    llm_dtype: str | None = None
    vision_markers: bool = False
    resize_policy: Literal["default", "release"] | None = None
    init_from: str | None = None
    reinit_wtc_gate: bool = False
    zero_wtc_gate: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        self.lora = as_lora_settings(self.lora)

    def encoder_kwargs(self) -> dict[str, Any]:
        """``timm.create_model`` keyword arguments: the weights file and the overrides that are set."""
        kwargs: dict[str, Any] = {}
        if self.encoder_weights is not None:
            if not Path(self.encoder_weights).is_file():
                raise MissingFileError(f"model.encoder_weights: no weights file at {self.encoder_weights!r}")
            kwargs["pretrained_path"] = self.encoder_weights
        for key in ENCODER_OVERRIDES:
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = tuple(value) if key == "wtc_layers" else value
        return kwargs


def build_model(settings: ModelSettings) -> LlavaUHD:
    """The model the settings describe, with ``init_from`` weights loaded, the resize policy set and, if asked,
    fresh WTC gates."""
    encoder_kwargs = settings.encoder_kwargs()
    init_from, llm = settings.init_from, settings.llm
    if init_from and not llm:  # the folder is the whole model (ours or a release)
        if not Path(init_from).is_dir():
            raise MissingFileError(f"model.init_from: with model.llm empty, a model folder is needed; "
                                   f"no folder at {init_from!r}")
        try:
            model = LlavaUHD.from_pretrained(init_from)
        except (ValueError, OSError) as err:  # a folder that is not a model, a damaged release, ...
            raise SettingsError(f"model.init_from: {err}") from err
        if settings.llm_dtype:
            model.llm.to(getattr(torch, settings.llm_dtype))
        log.info("model built from %s (encoder %s, projector %s)", init_from, model.config.encoder,
                 model.config.projector)
    else:
        if not llm:
            raise SettingsError("model.llm: empty; give a local LLM directory, or a model folder as model.init_from "
                                "(configs/release.yaml)")
        try:
            model = build_llava_uhd(settings.encoder, llm, settings.tokenizer, settings.projector, encoder_kwargs,
                                    settings.llm_dtype, settings.vision_markers)
        except ValueError as err:  # the encoder's config names its own field: name the CLI key
            message = str(err)
            if message.startswith(ENCODER_OVERRIDES):
                raise SettingsError(f"model.{message}") from err
            raise
        if init_from:
            load_weights(model, init_from)
    if settings.resize_policy is not None:
        model.config.resize_policy = settings.resize_policy
    if settings.reinit_wtc_gate and settings.zero_wtc_gate:
        raise SettingsError("model.reinit_wtc_gate and model.zero_wtc_gate: choose one (a live or a dead gate)")
    if settings.reinit_wtc_gate:
        reinit_wtc_gates(model)
    if settings.zero_wtc_gate:
        zero_wtc_gates(model)
    if settings.lora.enabled:
        settings.lora.check()
        if not init_from or not Path(init_from).is_dir():
            raise SettingsError(f"model.lora: LoRA fine-tunes a saved model, the base its adapters name; set "
                                f"model.init_from to a model folder (a release or an exported stage), got "
                                f"{init_from!r}")
        apply_lora(model, settings.lora, base=str(Path(init_from).resolve()))
    return model


def check_llm_keys(llm: dict[str, Any]) -> None:
    """A config-dict ``model.llm`` whose keys its transformers config knows: a typo (``num_hiden_layers``)
    would otherwise be kept as an unused attribute and the model built with the default instead. A key is
    unknown when the config class keeps it as a loose attribute that its default instance does not have."""
    from transformers import AutoConfig

    model_type = llm.get("model_type", "qwen2")
    try:
        default = AutoConfig.for_model(model_type)
        built = type(default)(**{k: v for k, v in llm.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError) as err:
        raise SettingsError(f"model.llm: not a valid {model_type!r} config: {str(err).split('. ')[0][:200]}") from err
    known = set(default.to_dict())
    unknown = sorted(k for k in set(built.to_dict()) - known if k in llm)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise SettingsError(f"model.llm: unknown key(s) for a {model_type} config: {', '.join(hints)}")


def build_llava_uhd(
    encoder: str,
    llm: str | dict[str, Any],
    tokenizer: str | None,
    projector: str,
    encoder_kwargs: dict[str, Any],
    llm_dtype: str | None = None,
    vision_markers: bool = False,
) -> LlavaUHD:
    """A LlavaUHD from the stage's flat settings. A config-dict LLM (random weights) gets the project's tiny
    offline tokenizer, built into ``tokenizer`` on first use."""
    if not timm.is_model(encoder):
        known = ", ".join(n for n in timm.list_models(["vit_uhd_*", "vit_gne_*", "vit_sbe_*"]))
        raise SettingsError(f"model.encoder: unknown encoder {encoder!r}; registered ViT-UHD / GNE / SBE encoders: "
                            f"{known}")
    if isinstance(llm, dict):
        if not tokenizer:
            raise SettingsError("model.tokenizer: a config-dict LLM needs a tokenizer directory")
        check_llm_keys(llm)
        tok = build_tiny_tokenizer(tokenizer)
        llm = {**tiny_qwen2_config(len(tok)), **llm} if "model_type" not in llm else {"vocab_size": len(tok), **llm}
    elif not Path(llm).is_dir():
        raise MissingFileError(f"model.llm: no local LLM directory at {llm!r} (nothing is downloaded)")
    if tokenizer and not isinstance(llm, dict) and not Path(tokenizer).is_dir():
        raise MissingFileError(f"model.tokenizer: no tokenizer directory at {tokenizer!r}")
    config = LlavaUHDConfig(
        encoder=encoder, encoder_kwargs=encoder_kwargs, projector=projector, llm=llm, tokenizer=tokenizer,
        llm_dtype=llm_dtype, vision_markers=vision_markers,
    )
    return LlavaUHD(config)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a Lightning checkpoint or an exported model folder, never unpickling objects.

    timm's ``load_state_dict`` reads the file (safetensors by suffix, else ``torch.load(weights_only=True)``)
    and picks a checkpoint's ``state_dict``; a Lightning module's ``model.`` prefix is dropped here."""
    path = Path(path)
    if path.is_dir() and is_release_folder(path):
        raise SettingsError(f"model.init_from: {path} is a LLaVA-format release; leave model.llm empty so that the "
                            "folder gives the whole model (configs/release.yaml)")
    if path.is_dir():
        file = path / WEIGHTS_NAME
        if not file.is_file():
            raise MissingFileError(f"model.init_from: {path} has no {WEIGHTS_NAME} (not an exported model folder)")
        try:
            return load_state_dict(str(file), use_ema=False)
        except (SafetensorError, OSError) as err:
            raise unreadable_checkpoint("model.init_from", file, err) from err
    if not path.is_file():
        raise MissingFileError(f"model.init_from: no checkpoint at {path}")
    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except UNREADABLE as err:  # timm re-raises torch's UnpicklingError as a RuntimeError: name the cause
        cause = err.__cause__ if isinstance(err.__cause__, pickle.UnpicklingError) else err
        raise unreadable_checkpoint("model.init_from", path, cause) from err
    except AttributeError as err:  # timm reads a dict's items: the file holds a tensor, a list, ...
        raise SettingsError(f"model.init_from: {path} holds a {type(err.obj).__name__}, not a checkpoint") from err
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")} or state


def load_weights(model: LlavaUHD, path: str | Path) -> None:
    """``init_from`` weights into ``model`` (non-strict), logging unused tensors and those left at init."""
    state = read_weights(path)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        log.warning("init_from %s: unused tensors %s", path, ", ".join(result.unexpected_keys))
    # A tied tensor (the LLM's input embedding and LM head) is stored once: the copy that is not in the file
    # shares its storage with one that is, so it was loaded too.
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    left = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]
    if left:
        log.warning("init_from %s: tensors left at init %s", path, ", ".join(left))
    log.info("initialised weights from %s (%d tensors)", path, len(state))


def _content_adaptive_wtc(model: nn.Module, key: str) -> list[str]:
    """Names of the content-adaptive WTC modules (``key``, the setting that asks: refused when there are none)."""
    from .vision.pvc import WindowedTokenCompression

    names = [n for n, m in model.named_modules()
             if isinstance(m, WindowedTokenCompression) and m.pooling == "content_adaptive"]
    if not names:
        raise SettingsError(f"{key}: the encoder has no content-adaptive WTC gate")
    return names


def reinit_wtc_gates(model: nn.Module) -> list[str]:
    """Fresh content-adaptive WTC gates (W1 random, b1 / W2 / b2 zero: exact average pooling, live gradient)."""
    names = _content_adaptive_wtc(model, "model.reinit_wtc_gate")
    for name in names:
        model.get_submodule(name).reset_parameters()
    log.info("reinit_wtc_gate: %d WTC gates re-initialised (%s)", len(names), ", ".join(names))
    return names


def zero_wtc_gates(model: nn.Module) -> list[str]:
    """Every content-adaptive WTC gate all zero (W1, b1, W2, b2), as the released model's loader leaves them."""
    names = _content_adaptive_wtc(model, "model.zero_wtc_gate")
    with torch.no_grad():
        for name in names:
            for param in model.get_submodule(name).parameters():
                param.zero_()
    log.info("zero_wtc_gate: %d WTC gates zeroed (%s): average pooling that never trains", len(names),
             ", ".join(names))
    return names


def fully_shard_model(model: LlavaUHD, mesh: Any) -> None:
    """FSDP2: shard each ViT block and each LLM decoder layer, then the root (which keeps patch embedding, WTC,
    projector, embeddings and LM head, unsharded by ``LlavaUHD.forward`` for the step)."""
    from torch.distributed.fsdp import fully_shard

    data_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    vit = getattr(model.encoder, "base", model.encoder)
    for block in vit.blocks:
        fully_shard(block, mesh=data_mesh)
    for layer in model.llm.model.layers:
        fully_shard(layer, mesh=data_mesh)
    fully_shard(model, mesh=data_mesh)
