"""vLLM's ``vllm.general_plugins`` entry point: registers the configs and the model class (lazily, by name)."""

from __future__ import annotations

import os

from llava_uhd.serve.spec import RELEASE_ARCHITECTURE, SERVE_ARCHITECTURE

MODEL_CLASS = "llava_uhd.serve.vllm_model:LlavaUHDForConditionalGeneration"


def register() -> None:
    """Called by vLLM in every process; safe to call more than once."""
    from PIL import Image
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from llava_uhd.serve.hf_config import LlavaQwenServeConfig, LlavaUHDServeConfig

    for config in (LlavaUHDServeConfig, LlavaQwenServeConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    for architecture in (SERVE_ARCHITECTURE, RELEASE_ARCHITECTURE):
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL_CLASS)
    if int(os.environ.get("VLLM_MAX_IMAGE_PIXELS", "178956970") or 0) > 0:
        # vLLM checks every image's header against VLLM_MAX_IMAGE_PIXELS and answers 400; PIL's own bomb check
        # would fire first (past twice its default) with an error vLLM answers 500
        Image.MAX_IMAGE_PIXELS = None
