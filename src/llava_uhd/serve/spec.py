"""What serving needs to know about a model folder, read with this package's own code and no vLLM.

A :class:`ServingSpec` holds the image path of one folder (a ``save_pretrained`` / export folder, or the released
LLaVA-format ``llava_qwen`` folder): the encoder's timm name and options, the projector, the resolution policy,
the token counter and the ``<|image_pad|>`` id. The vLLM processor (prompt side, no weights) and the vLLM model
(weights side) both build their parts from it, so they cannot disagree with each other or with
``LlavaUHD.from_pretrained``: the encoder is built by ``timm.create_model`` (on the meta device here: no memory,
no weights), and ``policy`` / ``token_counter`` are the encoder's own methods.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors import safe_open
from transformers.utils import logging as hf_logging

import llava_uhd.vision  # noqa: F401  (registers the vit_uhd_* / vit_gne_* timm models)
from llava_uhd import release
from llava_uhd.errors import ReleaseError
from llava_uhd.llm import load_tokenizer
from llava_uhd.mllm import CONFIG_NAME, WEIGHTS_NAME, LlavaUHDConfig
from llava_uhd.projector import build_projector
from llava_uhd.tokens import ImageTokenCounter
from llava_uhd.vision.registry import architecture_from_checkpoint
from llava_uhd.vision.resize import preprocess
from llava_uhd.vision.vit_uhd import ViTUHDConfig, encoder_name
from llava_uhd.vision.weights import normalise_state

SERVE_ARCHITECTURE = "LlavaUHDForConditionalGeneration"
"""``architectures`` entry of a saved folder's config.json: the vLLM model class of this package."""
SERVE_MODEL_TYPE = "llava_uhd"
"""``model_type`` of a saved folder's config.json."""
RELEASE_ARCHITECTURE = "LlavaQwenForCausalLM"
"""``architectures`` entry of the released folder's config.json (served by the same class)."""
CONFIG_ONLY_KEYS = ("architectures", "model_type")
"""config.json keys written for serving that are not ``LlavaUHDConfig`` fields."""

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class NotServableError(ValueError):
    """A folder this package cannot serve, with the reason."""


@dataclass(frozen=True)
class ServingSpec:
    """The image path of a model folder, as ``LlavaUHD.from_pretrained`` would build it."""

    folder: str
    kind: str
    """``saved`` (written by ``save_pretrained``) or ``release`` (the LLaVA-format release)."""
    config: LlavaUHDConfig
    """The model's config (for a release: the one ``LlavaUHD.from_release`` makes)."""
    encoder_name: str
    encoder_kwargs: dict[str, Any]
    llm_config: dict[str, Any]
    """The Qwen2 config as a dict (``model_type`` included)."""
    llm_dtype: str
    hidden_size: int
    image_token_id: int
    vision_start_id: int | None
    vision_end_id: int | None
    counter: ImageTokenCounter
    policy: Any
    tower_config: dict[str, Any] | None = None
    """Release only: the encoder folder's config.json when ``mm_vision_tower`` names a local one."""
    encoder_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Release only: what ``read_release`` passes to ``encoder_from_state_dict`` (e.g. ``num_heads``)."""

    def build_encoder(self, device: torch.device | str | None = None) -> torch.nn.Module:
        """The encoder as ``timm.create_model`` builds it for this folder (random weights; float32)."""
        with torch.device(device) if device is not None else _nullcontext():
            return timm.create_model(self.encoder_name, **self.encoder_kwargs)

    def build_projector(self, in_dim: int) -> torch.nn.Module:
        return build_projector(self.config.projector, in_dim, self.hidden_size)

    def num_image_tokens(self, height: int, width: int) -> int:
        """LLM positions of a preprocessed ``height x width`` image."""
        return self.counter(height, width)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the resolution policy resizes an upright ``height x width`` image to."""
        return tuple(self.policy.target_size(height, width))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """uint8 [3, H, W] pixels at the policy's size (``LlavaUHD.preprocess`` before normalising)."""
        return preprocess(image, self.policy, normalized=False)

    def placeholder_ids(self, count: int) -> list[int]:
        """The ids one image of ``count`` tokens takes in the prompt (markers included when the model uses them)."""
        run = [self.image_token_id] * count
        if self.config.vision_markers:
            return [self.vision_start_id, *run, self.vision_end_id]
        return run


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def saved_config(raw: dict[str, Any], folder: Path) -> LlavaUHDConfig:
    """A saved folder's config.json -> ``LlavaUHDConfig`` (the parsing ``LlavaUHD.from_pretrained`` does)."""
    raw = {k: v for k, v in raw.items() if k not in CONFIG_ONLY_KEYS}
    kwargs = raw.get("encoder_kwargs", {})
    raw["encoder_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    raw["tokenizer"] = str(folder)
    try:
        return LlavaUHDConfig(**raw)
    except TypeError as err:
        raise NotServableError(f"{folder / CONFIG_NAME}: not a LlavaUHD config ({err})") from err


def _meta_encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The release's encoder tensors as meta tensors of their shapes (read from the safetensors headers only)."""
    state = {}
    for path in release.weight_files(folder):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                if name.startswith(release.ENCODER_PREFIX):
                    view = handle.get_slice(name)
                    dtype = _DTYPES.get(view.get_dtype(), torch.float32)
                    state[name.removeprefix(release.ENCODER_PREFIX)] = torch.empty(view.get_shape(), dtype=dtype,
                                                                                   device="meta")
    if not state:
        raise ReleaseError(f"{folder}: no encoder tensors under {release.ENCODER_PREFIX!r}")
    return state


def _release_encoder(folder: Path, raw: dict[str, Any]) -> tuple[str, dict[str, Any], dict | None, dict[str, Any]]:
    """(timm name, options, tower config, overrides) of a release's encoder, as ``read_release`` builds it."""
    state = _meta_encoder_state(folder)
    tower_config = release.encoder_config(raw, folder)
    overrides: dict[str, Any] = {}
    if tower_config is None:
        overrides["num_heads"] = release._moonvit_heads(state, folder)
    ckpt = normalise_state(state, tower_config, source=folder)
    cfg = ViTUHDConfig(**{**architecture_from_checkpoint(ckpt), **overrides})
    kwargs = {k: v for k, v in cfg.to_dict().items() if k != "reduction"}
    return encoder_name(cfg), kwargs, tower_config, overrides


def _token_id(tokenizer: Any, token: str) -> int | None:
    token_id = tokenizer.convert_tokens_to_ids(token)
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


@functools.lru_cache(maxsize=8)
def load_spec(folder: str | Path) -> ServingSpec:
    """The serving spec of a model folder; a folder that cannot be served raises :class:`NotServableError`."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NotServableError(f"no model folder at {folder}")
    try:
        raw = release.read_config(folder)
    except ReleaseError as err:
        raise NotServableError(str(err)) from err
    if raw is None:
        raise NotServableError(f"{folder}: no {CONFIG_NAME}")
    try:
        is_release = release.is_release_folder(folder)
        if is_release:
            kind = raw.get("mm_projector_type", "mlp")
            if kind != "mlp":
                raise NotServableError(f"{folder / CONFIG_NAME}: mm_projector_type {kind!r} is not supported "
                                       "(the release's is 'mlp')")
            name, kwargs, tower_config, overrides = _release_encoder(folder, raw)
            llm = release.llm_config(raw)
            dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
            config = LlavaUHDConfig(encoder=name, encoder_kwargs=kwargs, projector="mlp", llm=llm, llm_dtype=dtype,
                                    tokenizer=str(folder), resize_policy="release")
        else:
            if "encoder" not in raw or not (folder / WEIGHTS_NAME).is_file():
                raise NotServableError(f"{folder} is not a model folder: it needs a {CONFIG_NAME} written by "
                                       f"save_pretrained (or a LLaVA-format release's) and {WEIGHTS_NAME}")
            config = saved_config(raw, folder)
            if not isinstance(config.llm, dict):
                raise NotServableError(f"{folder / CONFIG_NAME}: 'llm' must be the LLM's config dict")
            name, kwargs, tower_config, overrides = config.encoder, dict(config.encoder_kwargs), None, {}
            llm, dtype = dict(config.llm), config.llm_dtype or "float32"
    except (ReleaseError, ValueError) as err:
        if isinstance(err, NotServableError):
            raise
        raise NotServableError(str(err)) from err
    if name.startswith("vit_sbe"):
        raise NotServableError(f"{folder}: the slice-based encoder ({name}) is not servable through vLLM; "
                               "ViT-UHD (vit_uhd_*) and GNE (vit_gne_*) encoders are")
    if llm.get("model_type") != "qwen2":
        raise NotServableError(f"{folder}: the LLM is {llm.get('model_type')!r}; serving supports Qwen2")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer notes that config.json's model_type is not one it knows
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as err:
        raise NotServableError(f"{folder}: no usable tokenizer ({err})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if is_release:  # the tokens read_release adds (release.add_tokens), with the ids it gives them
        added = [t for t in release.ADDED_TOKENS if t not in tokenizer.get_vocab()]
        if added:
            tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    image_id = _token_id(tokenizer, config.image_token)
    start_id, end_id = _token_id(tokenizer, "<|vision_start|>"), _token_id(tokenizer, "<|vision_end|>")
    if image_id is None:
        raise NotServableError(f"{folder}: the tokenizer has no {config.image_token!r} token")
    with torch.device("meta"):
        encoder = timm.create_model(name, **kwargs)
        projector = build_projector(config.projector, encoder.embed_dim, int(llm["hidden_size"]))
    policy = encoder.policy(projector, config.min_pixels, config.max_pixels, config.max_side, config.resize_policy)
    return ServingSpec(
        folder=str(folder), kind="release" if is_release else "saved", config=config, encoder_name=name,
        encoder_kwargs=kwargs, llm_config=llm, llm_dtype=dtype, hidden_size=int(llm["hidden_size"]),
        image_token_id=image_id, vision_start_id=start_id, vision_end_id=end_id,
        counter=encoder.token_counter(projector), policy=policy, tower_config=tower_config,
        encoder_overrides=overrides,
    )
