"""The language model of LLaVA-UHD v3, loaded through transformers' Auto classes.

Two sources, nothing fetched from a hub:

- a local directory holding a causal LM with a chat template (a real Qwen2-7B-Instruct, or any other),
  loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``local_files_only=True``;
- a config dict (``tiny_qwen2_config``): random weights, for tests and the CPU demo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """A small Qwen2 config (as a plain dict, so it can live in YAML and in a saved model's config)."""
    config = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
    }
    config.update(overrides)
    return config


def llm_config_from(config: dict[str, Any]) -> PretrainedConfig:
    """The transformers config a config dict (``model_type`` plus that type's fields) describes."""
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("an LLM config dict needs a 'model_type' (e.g. 'qwen2')")
    return AutoConfig.for_model(model_type, **config)


def load_llm(
    path_or_config: str | Path | dict[str, Any],
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """Causal LM from a local directory (pretrained weights) or a config dict (random weights).

    ``vocab_size``: the tokenizer's length; the embeddings are resized when the tokenizer has more
    tokens than the model (for example after adding the image and separator tokens).
    """
    if isinstance(path_or_config, dict):
        model = AutoModelForCausalLM.from_config(llm_config_from(path_or_config), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_config), local_files_only=True, dtype=dtype)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


MODEL_FOLDER_TYPE = "llava_uhd"
"""``model_type`` of this package's model folders (written by ``LlavaUHD.save_pretrained`` for serving)."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer from a local Hugging Face directory; it must carry a chat template.

    In one of our model folders the ``config.json`` is the model's, which transformers does not know: the tokenizer
    class then comes from ``tokenizer_config.json`` alone (otherwise transformers warns that it reads the folder's
    config as an unknown model type)."""
    options: dict[str, Any] = {}
    try:
        if json.loads((Path(path) / "config.json").read_text()).get("model_type") == MODEL_FOLDER_TYPE:
            options["config"] = PretrainedConfig()
    except (OSError, ValueError, AttributeError):
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **options)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {path} has no chat template")
    return tokenizer


def llm_config_dict(model: PreTrainedModel) -> dict[str, Any]:
    """The LLM's config as a dict that ``load_llm`` rebuilds the same architecture from."""
    config = model.config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    return config
