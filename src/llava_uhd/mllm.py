"""LLaVA-UHD v3 (arXiv 2511.21150): vision encoder -> projector -> LLM.

Each image is encoded at its (policy-resized) native resolution, projected to the LLM width, and the
tokens replace, in row-major order, the run of ``<|image_pad|>`` ids that the conversation code expanded
each ``<image>`` placeholder into. The splice is one boolean mask + ``masked_scatter``; the number of
``<|image_pad|>`` positions must equal the number of visual tokens.

Three encoder kinds share this model, as in the paper's comparison (all timm names):

- ViT-UHD (``vit_uhd_*``: patch 10 + WTC) with the ``mlp`` projector (16x: the released model and the
  paper's 1.9x TTFT setting) or the ``merger`` (64x, found only in some of the paper's experiment checkpoints);
- GNE (``vit_gne_*``: patch 14, no WTC) with the ``merger`` (MoonViT / Qwen2-VL style);
- SBE (``vit_sbe_*``, :mod:`llava_uhd.vision.slicing`): thumbnail + fixed-size slices, joined with
  ``<|slice_sep|>`` / ``<|row_sep|>`` embeddings that take their place in the image's token run.

A saved model folder (``save_pretrained``: ``config.json`` + ``model.safetensors`` + the tokenizer) is
the unit passed between training stages and to evaluation; ``LlavaUHD.from_pretrained`` needs no
training code, and also reads the released model's LLaVA-format folder (:mod:`llava_uhd.release`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

import llava_uhd.vision  # noqa: F401  (registers the vit_uhd_* / vit_gne_* timm models)
from llava_uhd import generation, release
from llava_uhd.errors import ReleaseError
from llava_uhd.generation import GenerationResult
from llava_uhd.llm import MODEL_FOLDER_TYPE, llm_config_dict, load_llm, load_tokenizer
from llava_uhd.lora import LoraInfo, load_adapter, save_adapter
from llava_uhd.projector import build_projector
from llava_uhd.tokens import ImageTokenCounter
from llava_uhd.vision import slicing  # registers the vit_sbe_* timm models
from llava_uhd.vision.resize import POLICIES, ReleaseResolutionPolicy, ResolutionPolicy, normalize, preprocess

__all__ = ["LlavaUHD", "LlavaUHDConfig", "assign_weights", "is_sliced"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class LlavaUHDConfig:
    """Everything needed to rebuild a LLaVA-UHD v3 model (weights apart)."""

    encoder: str = "vit_uhd_so400m_patch10_siglip"
    """timm model name of the vision encoder (vit_uhd_*, vit_gne_* or vit_sbe_*)."""
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides passed to ``timm.create_model`` (e.g. wtc_pooling, pretrained_path, slice_size)."""
    projector: str = "mlp"
    """``mlp`` (one LLM token per encoder token: the released model's) or ``merger`` (2x2 merge)."""
    llm: str | dict[str, Any] = ""
    """A local causal-LM directory, or a config dict (random weights; see ``tiny_qwen2_config``)."""
    tokenizer: str | None = None
    """Tokenizer directory; None: the LLM directory (or, for a saved model, the model folder)."""
    llm_dtype: str | None = None
    """LLM weight dtype when loading (``bfloat16``, ...); None: the checkpoint's / float32."""
    image_token: str = "<|image_pad|>"
    """Token whose positions receive the visual tokens."""
    slice_separators: tuple[str, str] = ("<|slice_sep|>", "<|row_sep|>")
    """SBE only: tokens whose embeddings join slices of a row, and rows."""
    vision_markers: bool = False
    """Wrap each image's tokens in <|vision_start|> / <|vision_end|> in prompts built here."""
    min_pixels: int = 512 * 512
    """Resolution policy: smallest image area (native-resolution encoders)."""
    max_pixels: int = 1560 * 1560
    """Resolution policy: largest image area."""
    max_side: int = 5120
    """Resolution policy: cap on the longest side."""
    resize_policy: str = "default"
    """Resize rule: ``default`` (the product's) or ``release`` (the released model's: 1.4x upscale, floor, PIL)."""

    def __post_init__(self) -> None:
        if self.projector not in ("mlp", "merger"):
            raise ValueError(f"unknown projector {self.projector!r}")
        if self.resize_policy not in POLICIES:
            raise ValueError(f"unknown resize_policy {self.resize_policy!r}; choose one of {POLICIES}")
        if not self.llm:
            raise ValueError("llm must be a local directory or a config dict")
        self.slice_separators = tuple(self.slice_separators)
        if self.tokenizer is None and not isinstance(self.llm, dict):
            self.tokenizer = str(self.llm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_sliced(encoder: nn.Module) -> bool:
    """The SBE: its views are joined by separator embeddings, the one place the model treats it apart."""
    return isinstance(encoder, slicing.SliceEncoder)


class LlavaUHD(nn.Module):
    """Vision encoder + projector + causal LM. Parts not handed in are built from ``config``.

    The encoder counts and sizes images for the model (:class:`~llava_uhd.tokens.TokenCountingEncoder`).
    """

    def __init__(
        self,
        config: LlavaUHDConfig,
        encoder: nn.Module | None = None,
        projector: nn.Module | None = None,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        dtype = getattr(torch, config.llm_dtype) if config.llm_dtype else None
        self.llm = llm if llm is not None else load_llm(config.llm, dtype=dtype, vocab_size=len(self.tokenizer))
        self.encoder = encoder if encoder is not None else timm.create_model(config.encoder, **config.encoder_kwargs)
        hidden = self.llm.get_input_embeddings().embedding_dim
        self.projector = projector if projector is not None else build_projector(
            config.projector, self.encoder.embed_dim, hidden)
        self.image_token_id = self._token_id(config.image_token)
        self.lora: LoraInfo | None = None  # adapters on the LLM / ViT (llava_uhd.lora), set where they are added
        if is_sliced(self.encoder):  # the SBE's separator tokens
            self.register_buffer("separator_ids", torch.tensor([self._token_id(t) for t in config.slice_separators]),
                                 persistent=False)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token!r} token")
        return token_id

    # -- counting and preprocessing --------------------------------------------------------------------------
    @property
    def pixels_per_token(self) -> int:
        """Pixels per LLM token side: encoder reduction x projector merge (SBE: inside one slice)."""
        return self.encoder.reduction * self.projector.merge

    @property
    def policy(self) -> ResolutionPolicy | ReleaseResolutionPolicy | slicing.SliceGridPolicy:
        """The encoder's resolution policy under this config's limits and ``resize_policy``."""
        c = self.config
        return self.encoder.policy(self.projector, c.min_pixels, c.max_pixels, c.max_side, c.resize_policy)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Visual tokens (positions in the LLM sequence) of a preprocessed ``height x width`` image."""
        return self.encoder.num_image_tokens(height, width, self.projector)

    def image_token_counter(self) -> ImageTokenCounter:
        """A picklable ``(height, width) -> tokens`` equal to :meth:`num_image_tokens`."""
        return self.encoder.token_counter(self.projector)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised [3, H, W] at the size this model's resolution policy picks."""
        return preprocess(image, self.policy)

    # -- forward ---------------------------------------------------------------------------------------------
    def encoder_input(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]):
        """Pixels as the encoder takes them: normalised, in its dtype (tensor stays tensor, list stays list).

        uint8 pixels (what the data pipeline ships: 4x less to move between processes and to the
        device) are normalised here, on the model's device; float pixels are taken as normalised.
        """
        dtype = next(self.encoder.parameters()).dtype
        if isinstance(pixel_values, torch.Tensor):
            return self._as_input(pixel_values, dtype)
        return [self._as_input(p, dtype) for p in pixel_values]

    def run_encoder(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]):
        """Same-size tensor [N, 3, H, W]: dense path; list of [3, Hi, Wi]: packed path."""
        return self.encoder(self.encoder_input(pixel_values))

    def _as_input(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if pixels.dtype == torch.uint8:
            cfg = getattr(self.encoder, "cfg", None)
            pixels = normalize(pixels, *((cfg.mean, cfg.std) if hasattr(cfg, "mean") else ()))
        return pixels.to(dtype)

    def project(self, encoder_out) -> torch.Tensor:
        tokens = self.projector(encoder_out.tokens, encoder_out.grids)
        if is_sliced(self.encoder):  # the SBE: separator embeddings between its views
            separators = self.llm.get_input_embeddings()(self.separator_ids)
            tokens = self.encoder.join(tokens, encoder_out.layouts, separators)
        return tokens

    def encode_images(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images -> [sum N_i, D] LLM-width tokens, image after image, each in its token-stream order."""
        return self.project(self.run_encoder(pixel_values))

    def splice(self, input_ids: torch.Tensor, visual: torch.Tensor | None, sizes: list) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        positions = int(mask.sum())
        n_visual = 0 if visual is None else visual.shape[0]
        if n_visual != positions:
            counts = [self.num_image_tokens(h, w) for h, w in sizes]
            raise ValueError(
                f"input_ids hold {positions} {self.config.image_token} positions but the images give {n_visual} "
                f"tokens (sizes {sizes} -> {counts}); expand each <image> with num_image_tokens(h, w)"
            )
        if visual is None:
            return embeds
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Token embeddings with the visual tokens written over the ``<|image_pad|>`` positions, in order."""
        if pixel_values is None or len(pixel_values) == 0:
            return self.splice(input_ids, None, [])
        sizes = [tuple(p.shape[-2:]) for p in pixel_values]
        return self.splice(input_ids, self.encode_images(pixel_values), sizes)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **metadata: Any,
    ) -> CausalLMOutputWithPast:
        """Batch from the data pipeline -> LLM output (``.loss`` when labels are given, ``.logits``).

        ``pixel_values``: [N, 3, H, W] (same-size bucket: dense encoder path) or a list of [3, Hi, Wi]
        (mixed sizes: packed path), images in sample order. Other batch keys (image_sizes,
        images_per_sample, metadata) are not needed: the ``<|image_pad|>`` runs carry the layout.
        """
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    # -- generation ------------------------------------------------------------------------------------------
    def build_prompt_ids(self, prompt: str | list[dict], image_sizes: list[tuple[int, int]]) -> list[int]:
        """ChatML ids ending with the assistant header; ``<image>`` runs expanded to the right counts."""
        from llava_uhd.conversation import IMAGE_PLACEHOLDER, build_prompt

        if isinstance(prompt, str) and image_sizes and IMAGE_PLACEHOLDER not in prompt:
            prompt = (IMAGE_PLACEHOLDER + "\n") * len(image_sizes) + prompt
        counts = [self.num_image_tokens(h, w) for h, w in image_sizes]
        return build_prompt(prompt, self.tokenizer, counts, vision_markers=self.config.vision_markers)

    @torch.no_grad()  # not inference_mode: tensors the encoder caches here (index orders, RoPE tables) are reused
    def generate(     # by later training steps, and inference tensors cannot be saved for backward
        self,
        images: generation.Images,
        prompt: str | list[dict],
        max_new_tokens: int = 64,
        num_beams: int = 1,
        use_cache: bool = True,
        **generate_kwargs: Any,
    ) -> GenerationResult:
        """Answer ``prompt`` about ``images`` (PIL images are preprocessed; tensors are taken as they are).

        Greedy (``num_beams=1``) or beam search through ``transformers`` generate over ``inputs_embeds``
        with the KV cache. ``use_cache=False`` runs a plain greedy loop that re-reads the whole sequence
        every step (the reference the cached path is tested against). Timings: :mod:`llava_uhd.generation`.
        """
        return generation.generate(self, images, prompt, max_new_tokens, num_beams, use_cache, **generate_kwargs)

    # -- save / load -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer into ``save_dir``; a model with adapters
        writes its adapter folder instead (:func:`llava_uhd.lora.save_adapter`: PEFT format, trained parts, the
        base's name), which ``from_pretrained(base, adapter=save_dir)`` reads back."""
        if self.lora is not None:
            return save_adapter(self, save_dir)
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        encoder_kwargs = {k: v for k, v in self.config.encoder_kwargs.items() if k != "pretrained_path"}
        config = dataclasses.replace(
            self.config, llm=llm_config_dict(self.llm), tokenizer=None, encoder_kwargs=encoder_kwargs,
            llm_dtype=str(self.llm.dtype).removeprefix("torch."),
        )
        # architectures / model_type: what vLLM reads to pick the model class (llava_uhd.serve); not config fields
        serving = {"architectures": ["LlavaUHDForConditionalGeneration"], "model_type": MODEL_FOLDER_TYPE}
        (save_dir / CONFIG_NAME).write_text(json.dumps({**serving, **config.to_dict()}, indent=2))
        save_model(self, str(save_dir / WEIGHTS_NAME))
        self.tokenizer.save_pretrained(save_dir)
        return save_dir

    @classmethod
    def from_release(cls, folder: str | Path, resize_policy: str = "release", progress: bool = False,
                     **encoder_overrides: Any) -> LlavaUHD:
        """The released LLaVA-UHD v3 (a LLaVA-format folder), on the CPU, weights in their saved dtype.

        ``resize_policy``: ``release`` (default: the rule the model was trained with) or ``default``.
        ``progress``: a tqdm bar over the weight shards. ``model.load_report``
        (:class:`~llava_uhd.release.ReleaseLoadReport`) says where every tensor went."""
        parts = release.read_release(folder, progress, **encoder_overrides)
        config = LlavaUHDConfig(encoder=parts.encoder_name, encoder_kwargs=parts.encoder_kwargs, projector="mlp",
                                llm=parts.llm_config, llm_dtype=parts.llm_dtype, resize_policy=resize_policy)
        model = cls(config, encoder=parts.encoder, projector=parts.projector, llm=parts.llm, tokenizer=parts.tokenizer)
        model.load_report = parts.report
        return model

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, resize_policy: str | None = None,
                        adapter: str | Path | None = None) -> LlavaUHD:
        """Rebuild a model written by ``save_pretrained``, or read a release folder (no training code, nothing
        fetched), on the CPU. ``resize_policy`` overrides the folder's (a release: ``release``). ``adapter``: a
        LoRA run's adapter folder put on this base without merging (an adapter made for another base is a
        ``SettingsError``)."""
        if adapter is not None:
            model = cls.from_pretrained(model_dir, resize_policy)
            load_adapter(model, adapter)
            if resize_policy is not None:
                model.config.resize_policy = resize_policy
            return model
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"no model folder at {model_dir}")
        if release.is_release_folder(model_dir):
            return cls.from_release(model_dir, resize_policy=resize_policy or "release")
        raw = release.read_config(model_dir)
        if raw is None or "encoder" not in raw or not (model_dir / WEIGHTS_NAME).is_file():
            raise ValueError(f"{model_dir} is not a model folder: it needs a {CONFIG_NAME} written by save_pretrained "
                             f"(or a LLaVA-format release's) and {WEIGHTS_NAME}")
        for key in ("architectures", "model_type"):  # written for serving (save_pretrained), not config fields
            raw.pop(key, None)
        if resize_policy is not None:
            raw["resize_policy"] = resize_policy
        raw["encoder_kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["encoder_kwargs"].items()}
        raw["tokenizer"] = raw.get("tokenizer") or str(model_dir)
        config = LlavaUHDConfig(**raw)
        with release.parameters_on_meta():  # no random init of weights that are loaded next (a 7B LLM: minutes)
            model = cls(config)
        try:
            state = load_file(str(model_dir / WEIGHTS_NAME))
        except Exception as err:  # safetensors raises its own error types for a damaged (e.g. truncated) file
            raise ReleaseError(f"{model_dir / WEIGHTS_NAME}: not a readable safetensors file ({err})") from err
        assign_weights(model, state, model_dir / WEIGHTS_NAME)
        return model


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into a model whose parameters are on the meta device, strictly: every parameter and
    persistent buffer must be in ``state`` (a tied parameter saved once under another of its names counts), and
    nothing else may be. Each tensor takes the dtype the config gives its parameter, as a copying load would."""
    own = model.state_dict(keep_vars=True)
    state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys)
    for names in tied.values():  # assign broke the ties: point every name of a group at the loaded tensor
        loaded = [n for n in names if n not in missing]
        if len(names) > 1 and loaded:
            param = model.get_parameter(loaded[0])
            for name in names:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, param)
                missing.discard(name)
    if result.unexpected_keys or missing:
        raise ValueError(f"{source} does not match the model its config describes: missing "
                         f"{sorted(missing)[:8] or 'none'}, unexpected {sorted(result.unexpected_keys)[:8] or 'none'}")
