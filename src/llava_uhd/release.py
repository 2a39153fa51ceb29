"""Reading the released LLaVA-UHD v3 (a LLaVA-format ``llava_qwen`` folder) into the parts of a :class:`LlavaUHD`.

A release folder holds a Qwen2 ``config.json`` with the LLaVA fields (``model_type: llava_qwen``,
``mm_vision_tower``, ``mm_projector_type: mlp``, ``mm_hidden_size``), the weights as one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``, and Qwen2's tokenizer files.
Tensor names:

- ``model.vision_tower.vision_tower.<MoonViT name>``: the encoder, built by
  :func:`llava_uhd.vision.encoder_from_state_dict` from these tensors (plus the encoder folder's
  ``config.json`` when ``mm_vision_tower`` names a local one: the saved path is usually the training
  machine's, so a missing one only warns);
- ``model.mm_projector.proj.0.*`` / ``.proj.2.*``: the ``mlp`` projector (Linear, exact GELU, Linear);
- ``model.*`` (the rest) and ``lm_head.weight``: the Qwen2 language model.

Every tensor is accounted for: a tensor of no part is reported by name, a missing LLM or projector tensor
is an error. The tokenizer gets the image and vision tokens the conversation code needs (the release
marks an image with a placeholder instead); the embeddings are resized only when a new id does not fit in
the existing rows. Weights are only read with safetensors (through :func:`llava_uhd.vision.weights.read_weights`,
the one weights reader): a pickled checkpoint is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from llava_uhd.errors import ReleaseError
from llava_uhd.llm import llm_config_dict, llm_config_from, load_tokenizer
from llava_uhd.vision.weights import read_json, read_weights, shard_files, weights_path

log = logging.getLogger(__name__)

RELEASE_MODEL_TYPE = "llava_qwen"
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ENCODER_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
PROJECTOR_NAMES = {"proj.0.weight": "fc1.weight", "proj.0.bias": "fc1.bias",
                   "proj.2.weight": "fc2.weight", "proj.2.bias": "fc2.bias"}
ADDED_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
"""Special tokens the product's prompt building needs and Qwen2-7B-Instruct's tokenizer lacks."""

_warned: set[str] = set()


@dataclass
class ReleaseLoadReport:
    """Where every tensor of a release folder went."""

    encoder: int = 0
    projector: int = 0
    llm: int = 0
    dropped: list[str] = field(default_factory=list)
    """Tensors left out on purpose (the encoder's ``merger.zero_init_fc``: never used in the release's forward)."""
    unused: list[str] = field(default_factory=list)
    """Tensors of no part, or that their part does not know (reported, not loaded)."""
    added_tokens: list[str] = field(default_factory=list)
    resized_embeddings: bool = False


def read_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, or None when there is none; unreadable JSON is a ReleaseError."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as err:
        raise ReleaseError(str(err)) from err


def is_release_folder(folder: str | Path) -> bool:
    """True for a LLaVA-format folder (``model_type: llava_qwen`` or LLaVA's ``mm_vision_tower`` field)."""
    config = read_config(folder)
    return config is not None and (config.get("model_type") == RELEASE_MODEL_TYPE or "mm_vision_tower" in config)


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: ``model.safetensors``, or the shards its index lists."""
    try:
        path = weights_path(folder, pickles=False, kind="model")
        return shard_files(path) if path.name.endswith(".index.json") else [path]
    except (ValueError, OSError) as err:
        raise ReleaseError(str(err)) from err


def read_state(folder: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (shards merged); a name in two shards is an error."""
    try:
        return read_weights(folder, pickles=False, progress=progress, kind="model")
    except (ValueError, OSError) as err:
        raise ReleaseError(str(err)) from err


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """Release tensors -> (encoder in MoonViT names, projector in ours, LLM in Qwen2's, unused names)."""
    encoder, projector, llm, unused = {}, {}, {}, []
    for name, tensor in state.items():
        if name.startswith(ENCODER_PREFIX):
            encoder[name.removeprefix(ENCODER_PREFIX)] = tensor
        elif name.startswith(PROJECTOR_PREFIX):
            ours = PROJECTOR_NAMES.get(name.removeprefix(PROJECTOR_PREFIX))
            if ours is None:
                unused.append(name)
            else:
                projector[ours] = tensor
        elif name.startswith("model.") or name == "lm_head.weight":
            llm[name] = tensor
        else:
            unused.append(name)
    return encoder, projector, llm, unused


_LLAVA_FIELDS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "auto_map",
                 "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side",
                 "use_cache")


def llm_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 part of a release config, as a dict ``load_llm`` takes (LLaVA ``mm_*`` fields dropped)."""
    llm = {k: v for k, v in config.items()
           if not k.startswith(("mm_", "tune_mm", "freeze_mm", "use_mm", "unfreeze_mm")) and k not in _LLAVA_FIELDS}
    llm["model_type"] = "qwen2"
    return llm


def encoder_config(config: dict[str, Any], folder: Path) -> dict[str, Any] | None:
    """The encoder folder's config when ``mm_vision_tower`` names a local folder with one; else None (warned)."""
    tower = config.get("mm_vision_tower")
    if tower:
        for candidate in (Path(tower), folder / tower):
            found = read_config(candidate) if candidate.is_dir() else None
            if found is not None:
                return found
    key = f"{folder}:{tower}"
    if key not in _warned:
        _warned.add(key)
        log.warning("%s: mm_vision_tower %r is not a local encoder folder with a config.json; the encoder's "
                    "architecture is read from the weights and config.json alone", folder, tower)
    return None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (buffers stay real, so rotary tables are
    computed as usual): a 7B LLM is built without allocating or initialising 7B random weights."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept as is: tying reuses the same object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:  # initialisers run on meta tensors (no work) and transformers still ties embeddings as usual
        yield
    finally:
        nn.Module.register_parameter = original


def build_llm(config: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[PreTrainedModel, list[str]]:
    """Qwen2 LM from its config dict and weights (assigned, keeping their dtype); returns it and unused names."""
    with parameters_on_meta():
        llm = AutoModelForCausalLM.from_config(llm_config_from(config))
    result = llm.load_state_dict(state, strict=False, assign=True)
    if llm.config.tie_word_embeddings and "lm_head.weight" in result.missing_keys:
        llm.tie_weights()
    missing = [n for n, p in llm.named_parameters() if p.is_meta]
    if missing:
        raise ReleaseError(f"the release weights lack LLM tensors: {', '.join(missing[:8])}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return llm, list(result.unexpected_keys)


def add_tokens(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel) -> tuple[list[str], bool]:
    """Add the image / vision tokens a tokenizer lacks; resize the embeddings only if an id does not fit."""
    vocab = tokenizer.get_vocab()
    added = [t for t in ADDED_TOKENS if t not in vocab]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    resized = len(tokenizer) > llm.get_input_embeddings().num_embeddings
    if resized:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return added, resized


MOONVIT_HEAD_DIM = 72
"""MoonViT-SO-400M's head width (1152 / 16): the release's config.json does not say how many heads its encoder has."""


def _moonvit_heads(encoder_state: dict[str, torch.Tensor], folder: Path) -> int:
    kernel = encoder_state.get("patch_embed.proj.weight")
    if kernel is None:
        raise ReleaseError(f"{folder}: no {ENCODER_PREFIX}patch_embed.proj.weight: not a MoonViT-layout encoder")
    width = kernel.shape[0]
    if width % MOONVIT_HEAD_DIM:
        raise ReleaseError(f"{folder}: encoder width {width} is not a multiple of MoonViT's head width "
                           f"{MOONVIT_HEAD_DIM} and no encoder config.json gives num_attention_heads (point "
                           "mm_vision_tower at the encoder folder)")
    log.info("%s: no encoder config.json; %d heads of width %d assumed (MoonViT's)", folder,
             width // MOONVIT_HEAD_DIM, MOONVIT_HEAD_DIM)
    return width // MOONVIT_HEAD_DIM


@dataclass
class ReleaseParts:
    """The parts of a release folder, weights loaded, and what ``LlavaUHDConfig`` needs to describe them."""

    encoder: nn.Module
    projector: nn.Module
    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    encoder_name: str
    encoder_kwargs: dict[str, Any]
    llm_config: dict[str, Any]
    llm_dtype: str
    report: ReleaseLoadReport


def read_release(folder: str | Path, progress: bool = False, **encoder_overrides: Any) -> ReleaseParts:
    """Read a release folder into its parts, on the CPU, weights in their saved dtype (``LlavaUHD.from_release``
    assembles them). ``progress``: a tqdm bar over the weight shards."""
    from llava_uhd.projector import build_projector
    from llava_uhd.vision import encoder_from_state_dict

    folder = Path(folder)
    config = read_config(folder)
    if config is None:
        raise ReleaseError(f"{folder}: no {CONFIG_NAME}")
    kind = config.get("mm_projector_type", "mlp")
    if kind != "mlp":
        raise ReleaseError(f"{folder / CONFIG_NAME}: mm_projector_type {kind!r} is not supported "
                           "(the release's is 'mlp')")
    state = read_state(folder, progress)
    encoder_state, projector_state, llm_state, unused = split_state(state)
    if not encoder_state:
        raise ReleaseError(f"{folder}: no encoder tensors under {ENCODER_PREFIX!r}")
    tower_config = encoder_config(config, folder)
    if tower_config is None and "num_heads" not in encoder_overrides:
        encoder_overrides["num_heads"] = _moonvit_heads(encoder_state, folder)
    try:
        encoder = encoder_from_state_dict(encoder_state, tower_config, **encoder_overrides)
    except (ValueError, TypeError) as err:
        raise ReleaseError(f"{folder}: the encoder tensors ({ENCODER_PREFIX}*) do not make an encoder: {err}") from err
    enc_report, dropped = getattr(encoder, "load_report", None), []
    if enc_report is not None:
        if enc_report.missing or enc_report.new_modules:
            lacking = [*enc_report.missing, *enc_report.new_modules]
            raise ReleaseError(f"{folder}: the release weights lack encoder tensors: {', '.join(lacking[:8])}")
        unused += [ENCODER_PREFIX + n for n in enc_report.unexpected]
        dropped = [ENCODER_PREFIX + n for n in enc_report.dropped]
    hidden = config.get("mm_hidden_size")
    if hidden is not None and hidden != encoder.embed_dim:
        raise ReleaseError(f"{folder / CONFIG_NAME}: mm_hidden_size {hidden} but the encoder is "
                           f"{encoder.embed_dim} wide")
    llm_dict = llm_config(config)
    llm, llm_unused = build_llm(llm_dict, llm_state)
    unused += llm_unused
    projector = build_projector("mlp", encoder.embed_dim, llm.get_input_embeddings().embedding_dim)
    lacking = sorted(set(PROJECTOR_NAMES.values()) - projector_state.keys())
    if lacking:
        raise ReleaseError(f"{folder}: the mlp projector lacks {', '.join(PROJECTOR_PREFIX + n for n in lacking)}")
    projector.load_state_dict(projector_state)  # kept in fp32 like the encoder (as in our own models); the LLM
    # keeps the file's dtype, and the splice casts the visual tokens to it
    try:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer notes that config.json's model_type is not a known one
        try:
            tokenizer = load_tokenizer(folder)
        finally:
            hf_logging.set_verbosity(verbosity)
    except (OSError, ValueError) as err:
        raise ReleaseError(f"{folder}: no usable tokenizer ({err})") from err
    added, resized = add_tokens(tokenizer, llm)
    name = getattr(encoder, "registry_name", None) or (
        "vit_uhd_so400m_patch10_moonvit" if encoder.cfg.wtc_layers else "vit_gne_so400m_patch14_moonvit")
    encoder_kwargs = {k: v for k, v in encoder.cfg.to_dict().items() if k != "reduction"}
    report = ReleaseLoadReport(
        encoder=len(encoder_state) - len(dropped) - (len(enc_report.unexpected) if enc_report else 0),
        projector=len(projector_state), llm=len(llm_state) - len(llm_unused), dropped=dropped, unused=sorted(unused),
        added_tokens=added, resized_embeddings=resized,
    )
    if unused:
        log.warning("%s: %d tensors not used by any part: %s", folder, len(unused), ", ".join(sorted(unused)))
    return ReleaseParts(encoder, projector, llm, tokenizer, name, encoder_kwargs, llm_config_dict(llm),
                        str(llm.dtype).removeprefix("torch."), report)

