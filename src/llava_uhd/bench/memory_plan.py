"""The memory planner behind ``python -m llava_uhd.bench memory`` (:mod:`llava_uhd.bench.memory`): per-GPU memory
of a training run, full fine-tune vs LoRA vs QLoRA, with and without activation checkpointing.


Nothing is allocated: the model the settings describe is built on the meta device (from the config files of its
folders; the released LLaVA-UHD v3's architecture when the folder is not here), LoRA goes on through peft as in
training, and one training step (forward, backward, AdamW step, twice so that the optimizer state exists) runs on
meta tensors under torch's ``MemTracker``, which follows every tensor's storage as a GPU allocator would. The batch
is the data settings' worst case: as many images of ``data.max_pixels`` as ``data.batch_token_budget`` (visual
tokens) and ``data.max_batch_size`` allow, each sample ``data.max_length`` tokens at most.

What the trace cannot see is added by rule (docs/memory/README.md): attention runs as a flash kernel (what CUDA and
CPU pick; meta would take the math path and keep the attention matrix); QLoRA's LLM decoder weights are counted at
NF4's 4.13 bits per weight (4-bit codes, 8-bit block scales per 64, float32 scales of those per 256) plus one layer
dequantized at a time; DDP keeps a second copy of the gradients in its buckets; FSDP2 shards weights, gradients
and optimizer state N ways and unshards two blocks at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from llava_uhd.errors import SettingsError

ROOT = Path(__file__).resolve().parents[3]
BASE_CONFIG = ROOT / "configs" / "base.yaml"
MODES = ("full", "lora", "qlora")
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
DEFAULT_LORA = {"r": 128, "alpha": 256, "apply_to": ["llm"]}
GIB = 1024**3

# The released LLaVA-UHD v3 (docs/release.md): MoonViT-SO400M ViT-UHD (patch 10, WTC after blocks 4 and 18),
# the mlp projector, and a Qwen2-7B-Instruct LLM (its config.json; 152064 rows: the tokenizer padded).
RELEASE_ENCODER = "vit_uhd_so400m_patch10_moonvit"
RELEASE_LLM = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
               "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
               "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False, "hidden_act": "silu"}


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if key.endswith("+"):  # jsonargparse's list append (callbacks+)
            continue
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def read_settings(configs: list[str]) -> dict[str, Any]:
    """base.yaml then each config, merged as the training CLI merges them (what memory depends on)."""
    merged: dict[str, Any] = {}
    for path in [str(BASE_CONFIG), *configs]:
        file = Path(path)
        if not file.is_file():
            raise SettingsError(f"-c: no config file at {path}")
        try:
            data = yaml.safe_load(file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise SettingsError(f"-c: {path} is not valid YAML ({str(err).splitlines()[0]})") from err
        if data is None:
            continue
        if not isinstance(data, dict):
            raise SettingsError(f"-c: {path} holds a {type(data).__name__}, not a mapping of settings")
        _merge(merged, data)
    return merged


@dataclasses.dataclass
class RunShape:
    """What memory depends on, read from the settings."""

    model: dict[str, Any]
    trainable: tuple[str, ...]
    lora: dict[str, Any] | None
    gradient_checkpointing: bool
    precision: str
    images: int
    side: int
    seq_len: int
    source: str


def run_shape(settings: dict[str, Any]) -> RunShape:
    from datamodules import UHDDataModule
    from llava_uhd.build import ModelSettings

    model = dict(settings.get("model") or {})
    class_path = model.get("class_path", "llava_uhd.stages.SFT")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        stage = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SettingsError(f"model.class_path: cannot import {class_path!r}") from err
    args = dict(model.get("init_args") or {})
    known = {f.name for f in dataclasses.fields(ModelSettings)}
    model_settings = {k: v for k, v in args.items() if k in known}
    lora = model_settings.pop("lora", None)
    lora = lora if isinstance(lora, dict) and lora.get("r") is not None else None
    data = dict((settings.get("data") or {}).get("init_args") or {})
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(UHDDataModule.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    hp = {**defaults, **data}
    side = max(40, int(math.sqrt(hp["max_pixels"])) // 40 * 40)
    trainable = tuple(args.get("trainable") or stage.default_trainable)
    return RunShape(model_settings, trainable, lora, bool(args.get("gradient_checkpointing", False)),
                    str((settings.get("trainer") or {}).get("precision", "32-true")), 0, side,
                    int(hp["max_length"]), "")


# -- the model on meta ---------------------------------------------------------------------------------------------
def _folder_config(path: str | None) -> dict[str, Any] | None:
    if not path or not (Path(path) / "config.json").is_file():
        return None
    return json.loads((Path(path) / "config.json").read_text())


def meta_model(shape: RunShape, tokenizer_dir: str, device: str = "meta"):
    """The settings' model on the meta device (or, to measure it, ``device``), and where its architecture came
    from."""
    from llava_uhd import release
    from llava_uhd.mllm import LlavaUHD, LlavaUHDConfig
    from llava_uhd.tokenizer import build_tiny_tokenizer

    settings = shape.model
    tokenizer = build_tiny_tokenizer(tokenizer_dir)  # ids of the image tokens only: the LLM keeps its own vocab
    encoder, kwargs, llm = settings.get("encoder") or RELEASE_ENCODER, {}, settings.get("llm") or ""
    for key in ("patch_size", "wtc_layers", "wtc_pooling", "pos_embed_init"):
        if settings.get(key) is not None:
            kwargs[key] = tuple(settings[key]) if key == "wtc_layers" else settings[key]
    projector = settings.get("projector") or "mlp"
    init_from = settings.get("init_from")
    folder = _folder_config(init_from) if not llm else None
    if isinstance(llm, dict):
        llm_dict, source = {"vocab_size": len(tokenizer), **llm}, "the settings' model.llm"
        if "model_type" not in llm:
            from llava_uhd.llm import tiny_qwen2_config

            llm_dict = {**tiny_qwen2_config(len(tokenizer)), **llm}
    elif llm and _folder_config(llm) is not None:
        llm_dict, source = _folder_config(llm), f"{llm}/config.json"
    elif folder is not None and release.is_release_folder(init_from):
        llm_dict, source = release.llm_config(folder), f"{init_from}/config.json"
        encoder = RELEASE_ENCODER
    elif folder is not None and "encoder" in folder:
        encoder, kwargs = folder["encoder"], {k: tuple(v) if isinstance(v, list) else v
                                              for k, v in folder.get("encoder_kwargs", {}).items()}
        projector, llm_dict, source = folder.get("projector", projector), folder["llm"], f"{init_from}/config.json"
    else:
        llm_dict, encoder, kwargs, projector = dict(RELEASE_LLM), RELEASE_ENCODER, {}, "mlp"
        source = ("the released LLaVA-UHD v3's architecture (MoonViT ViT-UHD + mlp + Qwen2-7B; the settings' "
                  "model folder is not here)")
    kwargs.pop("pretrained_path", None)
    dtype = settings.get("llm_dtype") or (llm_dict.get("torch_dtype") if "encoder" not in (folder or {}) else None)
    config = LlavaUHDConfig(encoder=encoder, encoder_kwargs=kwargs, projector=projector,
                            llm={k: v for k, v in llm_dict.items() if k != "torch_dtype"}, tokenizer=tokenizer_dir,
                            llm_dtype=dtype if isinstance(dtype, str) and dtype != "float32" else None)
    import timm

    if not timm.is_model(encoder):
        raise SettingsError(f"model.encoder: unknown encoder {encoder!r}")
    try:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LlavaUHD(config, tokenizer=tokenizer)
    except (ValueError, TypeError, KeyError) as err:  # a setting the model's parts refuse
        raise SettingsError(f"model: cannot build the model the settings describe ({err})") from err
    return model, source


# -- one step on meta ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def flash_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` as the flash kernel (what CUDA and CPU run: it keeps the output and the
    log-sum-exp for backward, not the attention matrix the meta device's math path would keep)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or not query.is_meta:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, scale=scale)[0]

    from transformers import masking_utils

    packed = masking_utils.find_packed_sequence_indices  # reads position values: none on meta, none packed here
    F.scaled_dot_product_attention = flash
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        masking_utils.find_packed_sequence_indices = packed


def meta_batch(model, shape: RunShape, budget: int, max_batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    per_image = model.num_image_tokens(shape.side, shape.side)
    images = max(1, min(max_batch, budget // max(per_image, 1)))
    seq = max(shape.seq_len, per_image + 1)
    return (torch.empty(images, 3, shape.side, shape.side, device="meta"),
            torch.zeros(images, seq, dtype=torch.long, device="meta"), per_image)


def step(model, pixels: torch.Tensor, ids: torch.Tensor, per_image: int) -> torch.Tensor:
    """The training forward of :class:`LlavaUHD` with the splice done by shape (meta tensors hold no ids)."""
    visual = model.encode_images(pixels).reshape(ids.shape[0], per_image, -1)
    text = model.llm.get_input_embeddings()(ids[:, per_image:])
    embeds = torch.cat([visual.to(text.dtype), text], dim=1)
    return model.llm(inputs_embeds=embeds, labels=ids, use_cache=False).loss


def tracker():
    """torch's ``MemTracker``, taught that frozen parameters get no gradient (it hooks every parameter), keeping
    the step's peak only."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class FrozenAwareTracker(MemTracker):
        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            found = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        def hook(grad: torch.Tensor) -> None:
                            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(hook), param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)))
            return found

        def _update_peak_stats(self, peak_state) -> None:
            # the whole step's peak only: the per-module peaks torch also keeps cost a pass over every module at
            # every operation (minutes for an 8B model)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return FrozenAwareTracker()


@dataclasses.dataclass
class Estimate:
    mode: str
    checkpointing: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float
    total: float
    trainable: int
    frozen: int
    tokens: int


def prepared_model(shape: RunShape, mode: str, checkpointing: bool, tokenizer_dir: str, device: str):
    """The model of one mode, its parameters frozen or trained as a run of that mode does. On meta, QLoRA's LLM
    stays unquantized (bitsandbytes quantizes real values): :func:`trace` counts its NF4 bytes by rule."""
    from llava_uhd.lora import apply_lora, as_lora_settings, trains
    from llava_uhd.parts import part_of

    model, source = meta_model(shape, tokenizer_dir, device)
    adapted: set[str] = set()
    if mode != "full":
        lora = as_lora_settings({**(shape.lora or DEFAULT_LORA), "qlora": mode == "qlora" and device != "meta"})
        apply_lora(model, lora, base=None)
        adapted = model.lora.adapted_parts
    apply_to = (shape.lora or DEFAULT_LORA).get("apply_to", ["llm"])
    trainable = set(shape.trainable) if mode != "full" else set(shape.trainable) | {
        "llm" if "llm" in apply_to else "vit"}
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name, part_of(name), part_of(name) in trainable, adapted))
    if checkpointing:
        model.encoder.set_grad_checkpointing(True)
        model.llm.gradient_checkpointing_enable()
    return model, source


@dataclasses.dataclass
class Trace:
    """One mode's traced step on one GPU (bytes): what :func:`per_gpu` spreads over N GPUs."""

    mode: str
    checkpointing: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float
    gradients_at_peak: float
    buffers: float
    unit: float
    trainable: int
    frozen: int
    tokens: int


def trace(shape: RunShape, mode: str, checkpointing: bool, budget: int, max_batch: int, tokenizer_dir: str) -> Trace:
    """One mode's training step traced on the meta device."""
    model, shape.source = prepared_model(shape, mode, checkpointing, tokenizer_dir, "meta")
    quantized = _nf4_saving(model) if mode == "qlora" else 0.0
    compute = torch.bfloat16 if shape.precision.startswith("bf16") else None
    params = [p for p in model.parameters() if p.requires_grad]
    true_bytes = {id(p): p.element_size() for p in model.parameters()}
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in params)
    optim = 2 * grads  # AdamW: two moments in each parameter's dtype
    unit = _largest_unit_bytes(model, true_bytes)
    if compute is not None:  # mixed precision: matmuls (and so the activations) in 16 bits
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.is_floating_point():
                    module._parameters[key] = nn.Parameter(p.to(compute), requires_grad=p.requires_grad)
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    pixels, ids, per_image = meta_batch(model, shape, budget, max_batch)
    mem = tracker()
    mem.track_external(model, optimizer)
    with mem, flash_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(2):
            step(model, pixels, ids, per_image).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i == 0:  # the second step's peak counts: the optimizer state exists by then
                mem.reset_mod_stats()
                mem._peak_mem, mem._peak_mem_snap = {}, {}
    snap = next(iter(mem.get_tracker_snapshot("peak").values()))
    by = {getattr(k, "value", k): v for k, v in snap.items()}
    traced_grads = max(1, sum(p.numel() * p.element_size() for p in params))
    activations = by["Activation"] + by["Temp"]
    if mode == "qlora":
        activations += _largest_linear_bytes(model, compute)  # one layer dequantized at a time
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return Trace(mode, checkpointing, weights - quantized, grads, optim, activations,
                 by["Gradient"] * grads / traced_grads, by.get("Buffer", 0), unit, sum(p.numel() for p in params),
                 frozen, int(ids.numel()))


def per_gpu(t: Trace, gpus: int, strategy: str) -> Estimate:
    """Per-GPU bytes of a traced step on ``gpus`` GPUs: DDP adds its bucket copy of the gradients; FSDP2 shards
    weights, gradients and optimizer state and holds two unsharded units (the one running, the one prefetched)."""
    weights, grads, optim, peak_grads = t.weights, t.gradients, t.optimizer, t.gradients_at_peak
    if gpus > 1 and strategy == "ddp":
        grads, peak_grads = 2 * t.gradients, t.gradients_at_peak + t.gradients
    if gpus > 1 and strategy == "fsdp2":
        weights = t.weights / gpus + 2 * t.unit
        grads, optim, peak_grads = t.gradients / gpus, t.optimizer / gpus, t.gradients_at_peak / gpus
    total = weights + optim + peak_grads + t.activations + t.buffers
    return Estimate(t.mode, t.checkpointing, weights, grads, optim, t.activations, total, t.trainable, t.frozen,
                    t.tokens)


def _nf4_saving(model) -> float:
    """Bytes saved by storing the LLM's decoder linear weights in NF4 instead of their dtype."""
    import re

    saved = 0.0
    for name, module in model.llm.named_modules():
        if re.fullmatch(r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+(?:\.base_layer)?", name) and \
                type(module) is nn.Linear:
            w = module.weight
            saved += w.numel() * (w.element_size() - NF4_BYTES_PER_WEIGHT)
    return saved


def _largest_linear_bytes(model, compute: torch.dtype | None) -> float:
    size = torch.finfo(compute).bits // 8 if compute is not None else 4
    return max(m.weight.numel() for m in model.llm.model.layers.modules() if type(m) is nn.Linear) * size


def _largest_unit_bytes(model, true_bytes: dict[int, int]) -> float:
    """The largest FSDP2 unit (a ViT block, an LLM layer, or the root's own parameters) at full size."""
    vit = getattr(model.encoder, "base", model.encoder)
    units = [*vit.blocks, *model.llm.model.layers]
    inner = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() * true_bytes[id(p)] for p in model.parameters() if id(p) not in inner)
    return max([root, *(sum(p.numel() * true_bytes[id(p)] for p in u.parameters()) for u in units)])


# -- the command ---------------------------------------------------------------------------------------------------
def plan(configs: list[str], modes: tuple[str, ...] = MODES, checkpointing: tuple[bool, ...] = (False, True)
         ) -> tuple[RunShape, list[Trace]]:
    """The run's steps traced on meta, one per mode and checkpointing setting."""
    settings = read_settings(configs)
    shape = run_shape(settings)
    data = dict((settings.get("data") or {}).get("init_args") or {})
    budget, max_batch = int(data.get("batch_token_budget", 16384)), int(data.get("max_batch_size", 32))
    traces = []
    with tempfile.TemporaryDirectory() as tok:
        for mode in modes:
            for ckpt in checkpointing:
                traces.append(trace(shape, mode, ckpt, budget, max_batch, tok))
    return shape, traces
