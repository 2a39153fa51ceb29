"""transformers configs for the two folder kinds vLLM is pointed at (registered with ``AutoConfig`` by the plug-in).

vLLM reads the language model's shape from ``get_text_config()``: both configs carry the Qwen2 config as
``text_config``; everything else stays as the folder's config.json has it.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from llava_uhd import release
from llava_uhd.llm import llm_config_from


def _text_config(llm: dict[str, Any], dtype: str | None) -> PretrainedConfig:
    text = llm_config_from(llm)
    if dtype:
        text.dtype = dtype
    return text


class LlavaUHDServeConfig(PretrainedConfig):
    """A ``save_pretrained`` folder's config.json (``model_type: llava_uhd``)."""

    model_type = "llava_uhd"

    def __init__(self, llm: dict[str, Any] | None = None, llm_dtype: str | None = None, **kwargs: Any) -> None:
        kwargs.pop("text_config", None)
        super().__init__(**kwargs)
        self.llm = llm or {}
        self.llm_dtype = llm_dtype
        if isinstance(self.llm, dict) and self.llm:
            self.text_config = _text_config(self.llm, llm_dtype)
            self.dtype = llm_dtype or "float32"

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return getattr(self, "text_config", self)


class LlavaQwenServeConfig(PretrainedConfig):
    """The released LLaVA-format config.json (``model_type: llava_qwen``): Qwen2's fields plus LLaVA's ``mm_*``."""

    model_type = "llava_qwen"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("text_config", None)
        fields = dict(kwargs)
        super().__init__(**kwargs)
        if "hidden_size" in fields:
            dtype = fields.get("torch_dtype") or fields.get("dtype")
            self.text_config = _text_config(release.llm_config(fields), str(dtype) if dtype else None)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        return getattr(self, "text_config", self)
