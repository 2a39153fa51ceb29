"""The vLLM model and multimodal processor of LLaVA-UHD v3 (imported by vLLM through the plug-in, never by the product).

- Processor (API server process, no weights): each image is decoded from the request's own bytes and resized by
  this package's resolution policy (:meth:`ServingSpec.preprocess`, the pixels ``LlavaUHD.generate`` sees); the
  ``<|image_pad|>`` in the prompt becomes the run of ids the token counter gives (wrapped in the vision markers
  when the model uses them). A prompt whose image-token count then differs from the images' is refused.
- Model (workers): this package's encoder (timm) and projector, kept in float32 as ``LlavaUHD`` keeps them, each
  image encoded on its own (a request's answer does not depend on what else is batched); vLLM's own Qwen2 runs the
  language model (paged attention, tensor- and pipeline-parallel layers). The vision part is replicated on every
  rank.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.media import MediaWithBytes
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.multimodal.processing.processor import HFMultiModalInputs
from vllm.sequence import IntermediateTensors

from llava_uhd import release
from llava_uhd.serve.spec import ServingSpec, load_spec
from llava_uhd.vision import encoder_from_state_dict
from llava_uhd.vision.resize import normalize

IMAGE_PAD = "<|image_pad|>"


class LlavaUHDProcessingInfo(BaseProcessingInfo):
    """Counting and sizing, from the folder's :class:`ServingSpec`."""

    @cached_property
    def spec(self) -> ServingSpec:
        return load_spec(self.ctx.model_config.model)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def largest_image(self) -> tuple[int, int]:
        """(height, width) of a square image at the policy's largest area: the most tokens an image can take."""
        side = math.isqrt(self.spec.config.max_pixels)
        return self.spec.target_size(side, side)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        height, width = self.largest_image()
        return {"image": len(self.spec.placeholder_ids(self.spec.num_image_tokens(height, width)))}


class LlavaUHDDummyInputsBuilder(BaseDummyInputsBuilder[LlavaUHDProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PAD * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        height, width = self.info.largest_image()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


def _as_pil(item: object) -> Image.Image:
    """The request's image as PIL opens it from its own bytes (as ``LlavaUHD.generate`` gets a file), else as given."""
    if isinstance(item, MediaWithBytes):
        if isinstance(item.original_bytes, bytes) and item.original_bytes:
            return Image.open(io.BytesIO(item.original_bytes))
        item = item.media
    if isinstance(item, Image.Image):
        return item
    raise ValueError(f"unsupported image input of type {type(item).__name__}")


class LlavaUHDMultiModalProcessor(BaseMultiModalProcessor[LlavaUHDProcessingInfo]):
    """Pixels through this package's policy; placeholder runs from its token counter."""

    def _get_hf_mm_inputs(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]):
        hf_data, hf_kwargs, passthrough = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        if "images" in hf_data and "image" in mm_items:  # the raw items: MediaWithBytes keeps the request's bytes
            items = mm_items["image"]
            hf_data = dict(hf_data, images=[items.data[i] for i in range(items.get_count())])
        return HFMultiModalInputs(hf_data, hf_kwargs, passthrough)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        spec = self.info.spec
        pixels, grids = [], []
        for item in hf_data.get("images") or []:
            try:
                image = _as_pil(item)
                image.load()
                tensor = spec.preprocess(image)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise ValueError(f"the image could not be read: {err}") from err
            pixels.append(tensor)
            grids.append(torch.tensor(tensor.shape[-2:]))
        return BatchFeature({"pixel_values": pixels, "image_size": grids})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"pixel_values": MultiModalFieldConfig.batched("image"),
                "image_size": MultiModalFieldConfig.batched("image")}

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """A tokenizer without ``<|image_pad|>`` (the release's) spells it in pieces: put the model's id back."""
        spec = self.info.spec
        tokenizer = self.info.get_tokenizer()
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) == spec.image_token_id:
            return prompt
        text = tokenizer.decode(prompt)
        if IMAGE_PAD not in text:
            return prompt
        out: list[int] = []
        for i, part in enumerate(text.split(IMAGE_PAD)):
            if i:
                out.append(spec.image_token_id)
            if part:
                out += tokenizer.encode(part, add_special_tokens=False)
        return out

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        spec = self.info.spec
        items = out_mm_kwargs.get("image", [])

        def replacement(item_idx: int) -> PromptUpdateDetails:
            height, width = (int(v) for v in items[item_idx]["image_size"].data)
            ids = spec.placeholder_ids(spec.num_image_tokens(height, width))
            return PromptUpdateDetails.select_token_id(ids, spec.image_token_id)

        return [PromptReplacement(modality="image", target=[spec.image_token_id], replacement=replacement)]

    def apply(self, inputs, timing_ctx):
        result = super().apply(inputs, timing_ctx)
        spec = self.info.spec
        expected = sum(r.get_num_embeds() if hasattr(r, "get_num_embeds") else r.length
                       for r in result["mm_placeholders"].get("image", []))
        found = result["prompt_token_ids"].count(spec.image_token_id)
        if found != expected:
            raise ValueError(f"the prompt holds {found} {IMAGE_PAD} tokens but its images take {expected}: "
                             f"write at most one {IMAGE_PAD} per image, or none (one is added for each image)")
        return result


@MULTIMODAL_REGISTRY.register_processor(LlavaUHDMultiModalProcessor, info=LlavaUHDProcessingInfo,
                                        dummy_inputs=LlavaUHDDummyInputsBuilder)
class LlavaUHDForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """ViT-UHD encoder + projector (this package) -> vLLM's Qwen2."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PAD
        raise ValueError("only images are supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.spec = load_spec(vllm_config.model_config.model)
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.get_text_config().vocab_size,
                                         mm_token_ids=[self.spec.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)  # LlavaUHD keeps the encoder and projector in float32
            try:
                self.encoder = self.spec.build_encoder()
                self.projector = self.spec.build_projector(self.encoder.embed_dim)
            finally:
                torch.set_default_dtype(default)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.get_text_config(),
                prefix=maybe_prefix(prefix, "language_model"), architectures=["Qwen2ForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # -- images ---------------------------------------------------------------------------------------------------
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        image = normalize(pixels.to(device)).float().unsqueeze(0)  # the normalisation preprocess applies
        out = self.encoder(image)
        return self.projector(out.tokens, out.grids)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        images = list(pixel_values) if isinstance(pixel_values, list | tuple) else list(pixel_values.unbind(0))
        return [self._encode(p) for p in images]

    # -- language model -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # -- weights --------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Saved folders: ``encoder.*``, ``projector.*``, ``llm.*``. The release: MoonViT tensors under
        ``model.vision_tower.vision_tower.``, ``model.mm_projector.proj.0/.2``, and Qwen2's own names."""
        vision: dict[str, torch.Tensor] = {}
        projector: dict[str, torch.Tensor] = {}
        text: list[tuple[str, torch.Tensor]] = []
        tied = getattr(self.config.get_text_config(), "tie_word_embeddings", False)
        for name, tensor in weights:
            if self.spec.kind == "release":
                if name.startswith(release.ENCODER_PREFIX):
                    vision[name.removeprefix(release.ENCODER_PREFIX)] = tensor
                    continue
                if name.startswith(release.PROJECTOR_PREFIX):
                    ours = release.PROJECTOR_NAMES.get(name.removeprefix(release.PROJECTOR_PREFIX))
                    if ours is not None:
                        projector[ours] = tensor
                    continue
                text.append((name, tensor))
                continue
            if name.startswith("encoder."):
                vision[name.removeprefix("encoder.")] = tensor
            elif name.startswith("projector."):
                projector[name.removeprefix("projector.")] = tensor
            elif name.startswith("llm."):
                name = name.removeprefix("llm.")
                if tied and name == "lm_head.weight":  # a tied pair saved once under the head's name
                    name = "model.embed_tokens.weight"
                text.append((name, tensor))
        loaded = {"language_model." + n for n in self.language_model.load_weights(text)}
        if self.spec.kind == "release":
            encoder = encoder_from_state_dict(vision, self.spec.tower_config, **self.spec.encoder_overrides)
            vision = encoder.state_dict()
        self._load_vision(self.encoder, vision, "encoder")
        self._load_vision(self.projector, projector, "projector")
        loaded |= {"encoder." + n for n, _ in self.encoder.named_parameters()}
        loaded |= {"projector." + n for n, _ in self.projector.named_parameters()}
        return loaded

    @staticmethod
    def _load_vision(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        own = module.state_dict()
        missing = sorted(k for k in own if k not in state)
        unexpected = sorted(k for k in state if k not in own)
        if missing or unexpected:
            raise ValueError(f"the {what} weights do not match the folder's config: missing {missing[:8] or 'none'}, "
                             f"unexpected {unexpected[:8] or 'none'}")
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(state[name].to(value.dtype))
