"""LoRA and QLoRA fine-tuning through peft (docs/lora.md): the ``model.lora.*`` settings, adapters on the LLM and
the ViT, and their files in PEFT's own format.

Adapters are injected with ``peft.inject_adapter_in_model`` into ``model.llm`` and / or ``model.encoder``, so every
parameter keeps its ``LlavaUHD`` name (the adapted layer's own weight moves to ``<layer>.base_layer.weight``, the
adapter is ``<layer>.lora_A.default.weight`` / ``lora_B``) and :func:`llava_uhd.parts.part_of` files each adapter
under the part it sits in (``llm`` or ``vit``): it trains at that part's learning rate. A part that holds adapters
trains only its adapters, whatever ``model.trainable`` says; the other parts train or stay frozen as the stage
says (the usual LLaVA recipe: LLM adapters beside a fully trained projector and WTC gates).

QLoRA (``model.lora.qlora``) stores the LLM's decoder linear layers in 4-bit NF4 through bitsandbytes before the
adapters go on; it is refused, in one message, where the installed bitsandbytes cannot run NF4 on this machine.

A LoRA run's model folder (``save_pretrained``, the stage's export) is an adapter folder:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LLM's adapter, loadable as it is by
  ``peft.PeftModel.from_pretrained(base_llm, folder)``; its ``base_model_name_or_path`` names the base folder;
- ``vision_adapter/``: the same for the ViT's adapters (onto ``model.encoder``), when it has some;
- ``parts.safetensors``: the trained non-LoRA parts (projector, WTC gates, ...) in ``LlavaUHD`` names;
- ``llava_uhd_adapter.json``: the base folder, a digest of the adapted base weights (an adapter put on another
  base is refused), the settings and the parts stored.

``LlavaUHD.from_pretrained(base, adapter=folder)`` loads it without merging; ``python -m llava_uhd.convert merge``
writes the merged model folder.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from .errors import MissingFileError, SettingsError
from .parts import part_of

log = logging.getLogger(__name__)

MANIFEST_NAME = "llava_uhd_adapter.json"
PARTS_NAME = "parts.safetensors"
VISION_DIR = "vision_adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "llava_uhd.lora/1"
ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every key


class AdaptableModel(Protocol):
    """What the adapter code needs of a model (:class:`llava_uhd.mllm.LlavaUHD`, which imports this module): the
    two submodules adapters go into, the model's config, its ``lora`` record and its parameters."""

    llm: nn.Module
    encoder: nn.Module
    config: Any
    lora: LoraInfo | None

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, nn.Parameter]]: ...

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


@dataclass(frozen=True)
class Target:
    """Where a ``model.lora.apply_to`` entry puts adapters: a submodule of ``LlavaUHD``, the scope (a regex over
    module names inside it) and the linear layers adapted by default."""

    module: str
    scope: str
    part: str
    defaults: tuple[str, ...]
    label: str


TARGETS: dict[str, Target] = {
    "llm": Target("llm", r"model\.layers\.\d+\.(?:self_attn|mlp)", "llm",
                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "the LLM's layers"),
    "vit_attention": Target("encoder", r"(?:base\.)?blocks\.\d+\.attn", "vit", ("qkv", "proj"),
                            "the ViT's attention"),
    "vit_mlp": Target("encoder", r"(?:base\.)?blocks\.\d+\.mlp", "vit", ("fc1", "fc2"), "the ViT's MLP"),
}
ADAPTED_MODULES = ("llm", "encoder")
"""The ``LlavaUHD`` submodules that can hold adapters, and where each one's adapter folder is."""
ADAPTER_DIRS = {"llm": ".", "encoder": VISION_DIR}


@dataclass
class LoraSettings:
    """``model.lora.*``: LoRA on the chosen parts (off while ``r`` is unset).

    Args:
        r: adapter rank; unset (null): no LoRA.
        alpha: LoRA scale numerator (the update is scaled by alpha / r); unset: 2 r.
        dropout: dropout on the adapter's input.
        target_modules: linear layer names to adapt inside the ``apply_to`` parts (e.g. ``[q_proj, v_proj]``);
            unset: every linear layer there (LLM: q/k/v/o and gate/up/down; ViT attention: qkv, proj; MLP: fc1, fc2).
        apply_to: where adapters go: ``llm``, ``vit_attention``, ``vit_mlp`` (any of them). A part with adapters
            trains only its adapters.
        qlora: keep the LLM's decoder layers in 4-bit NF4 (bitsandbytes) under the adapters.
    """

    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.05
    target_modules: list[str] | None = None
    apply_to: list[Literal["llm", "vit_attention", "vit_mlp"]] = field(default_factory=lambda: ["llm"])
    qlora: bool = False

    @property
    def enabled(self) -> bool:
        return self.r is not None

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * float(self.r)

    def check(self) -> None:
        """Every value in range, before anything is built: one message naming the key."""
        r = self.r
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise SettingsError(f"model.lora.r: a positive integer rank (leave it unset for no LoRA), got {r!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float)
                                       or not 0 < self.alpha < float("inf")):
            raise SettingsError(f"model.lora.alpha: a positive number (unset: 2 r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise SettingsError(f"model.lora.dropout: a number in [0, 1), got {self.dropout!r}")
        apply_to = list(self.apply_to or [])
        if not apply_to:
            raise SettingsError(f"model.lora.apply_to: empty; choose from {', '.join(TARGETS)}")
        unknown = [a for a in apply_to if a not in TARGETS]
        if unknown:
            raise SettingsError(f"model.lora.apply_to: unknown {', '.join(map(repr, unknown))}; choose from "
                                f"{', '.join(TARGETS)}")
        if len(set(apply_to)) != len(apply_to):
            raise SettingsError(f"model.lora.apply_to: listed twice: {apply_to}")
        if self.target_modules is not None and (not self.target_modules or not all(
                isinstance(t, str) and t for t in self.target_modules)):
            raise SettingsError(f"model.lora.target_modules: a non-empty list of layer names (unset: every linear "
                                f"layer of apply_to), got {self.target_modules!r}")
        if self.qlora and "llm" not in apply_to:
            raise SettingsError("model.lora.qlora: quantizes the LLM under its adapters; add llm to "
                                "model.lora.apply_to")


def as_lora_settings(value: LoraSettings | dict[str, Any] | None) -> LoraSettings:
    """``model.lora`` as given (the CLI's dataclass, a dict from Python or a checkpoint, or nothing)."""
    if value is None:
        return LoraSettings()
    if isinstance(value, LoraSettings):
        return value
    if not isinstance(value, dict):
        raise SettingsError(f"model.lora: a mapping of LoRA settings, got {type(value).__name__}")
    known = [f.name for f in fields(LoraSettings)]
    unknown = [k for k in value if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k
                 for k in unknown]
        raise SettingsError(f"model.lora: unknown key(s) {', '.join(hints)}; the keys are {', '.join(known)}")
    return LoraSettings(**value)


@dataclass
class LoraInfo:
    """What a model with adapters knows about them (``LlavaUHD.lora``)."""

    settings: LoraSettings
    base: str | None
    digest: str | None
    parts: tuple[str, ...] = ()
    """Non-LoRA parts whose full tensors an adapter folder stores (set by the stage: the parts it trains)."""

    @property
    def adapted_parts(self) -> set[str]:
        return {TARGETS[a].part for a in self.settings.apply_to}


# -- parameters --------------------------------------------------------------------------------------------------
def is_adapter(name: str) -> bool:
    """A LoRA parameter's name (``...lora_A.default.weight``, ``lora_B``, ``lora_embedding_*``, ``lora_magnitude*``)."""
    return ".lora_" in f".{name}"


def adapted_parts(model: nn.Module) -> set[str]:
    """Training parts (``llm``, ``vit``) that hold adapters; empty without LoRA."""
    info = getattr(model, "lora", None)
    return info.adapted_parts if isinstance(info, LoraInfo) else set()


def trains(name: str, part: str, part_trains: bool, adapted: set[str]) -> bool:
    """Whether a parameter trains: every adapter does; a part with adapters trains nothing else; other parts
    train as the stage says (``part_trains``)."""
    if is_adapter(name):
        return True
    return part_trains and part not in adapted


# -- targets -----------------------------------------------------------------------------------------------------
def linear_names(module: nn.Module, scope: str) -> dict[str, str]:
    """``{full name: leaf name}`` of the linear layers (plain or 4-bit) under ``scope`` in ``module``."""
    pattern = re.compile(rf"{scope}\.([A-Za-z0-9_]+)")
    found = {}
    for name, sub in module.named_modules():
        match = pattern.fullmatch(name)
        if match and isinstance(sub, nn.Linear):
            found[name] = match.group(1)
    return found


def plan_targets(model: AdaptableModel, settings: LoraSettings) -> dict[str, tuple[str, list[str]]]:
    """``{submodule: (regex for LoraConfig.target_modules, adapted layer names)}``; an unknown target module is a
    :class:`SettingsError` naming the layers there are."""
    wanted = settings.target_modules
    per_module: dict[str, list[tuple[str, str]]] = {}
    available: dict[str, set[str]] = {}
    for key in settings.apply_to:
        target = TARGETS[key]
        module = getattr(model, target.module)
        layers = linear_names(module, target.scope)
        if not layers:
            raise SettingsError(f"model.lora.apply_to: {key}: {target.label} hold no linear layer in this model "
                                f"({model.config.encoder})")
        leaves = set(layers.values())
        available[key] = leaves
        chosen = set(wanted) & leaves if wanted is not None else set(target.defaults) & leaves
        if chosen:
            per_module.setdefault(target.module, []).append((target.scope, "|".join(sorted(chosen))))
    if wanted is not None:
        every = set().union(*available.values())
        unknown = [t for t in wanted if t not in every]
        if unknown:
            hints = [f"{t!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(t, every, 1)) else repr(t)
                     for t in unknown]
            where = "; ".join(f"{TARGETS[k].label}: {', '.join(sorted(v))}" for k, v in available.items())
            raise SettingsError(f"model.lora.target_modules: no linear layer named {', '.join(hints)} in "
                                f"{', '.join(settings.apply_to)} ({where})")
    for key in settings.apply_to:
        if TARGETS[key].module not in per_module:
            raise SettingsError(f"model.lora.target_modules: none of {wanted} is in {TARGETS[key].label} "
                                f"({', '.join(sorted(available[key]))}), which apply_to lists")
    plan = {}
    for name, scopes in per_module.items():
        regex = "|".join(f"(?:{scope})\\.(?:{leaves})" for scope, leaves in scopes)
        module = getattr(model, name)
        names = sorted(n for n in dict(module.named_modules()) if re.fullmatch(regex, n))
        plan[name] = (regex, names)
    return plan


def base_digest(model: AdaptableModel, plan: dict[str, tuple[str, list[str]]]) -> str | None:
    """A digest of the weights the adapters sit on (names, shapes and a sample of values, rounded to bfloat16 so
    that a base saved in another float dtype matches): an adapter is refused on another base. None on meta."""
    h = hashlib.sha256()
    for module_name in sorted(plan):
        module = getattr(model, module_name)
        for name in plan[module_name][1]:
            layer = module.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            weight = layer.weight
            if weight.is_meta:
                return None
            if getattr(weight, "quant_state", None) is not None or weight.dtype == torch.uint8:
                raise SettingsError("adapter: the base is already quantized; load it in full precision")
            flat = weight.detach().reshape(-1)
            sample = torch.cat([flat[:256], flat[-256:]]).float().cpu().to(torch.bfloat16)
            h.update(f"{module_name}.{name}:{tuple(weight.shape)}".encode())
            h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# -- QLoRA -------------------------------------------------------------------------------------------------------
def qlora_refusal() -> str | None:
    """Why the installed bitsandbytes cannot run a 4-bit NF4 layer here (None: it can), tried on a tiny layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'llava-uhd[qlora]')"
    except Exception as err:  # a build for another platform fails in its own ways at import
        return f"bitsandbytes does not load here ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    try:
        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(16, 16), requires_grad=False, quant_type="nf4")
        layer = layer.to(_device())
        x = torch.randn(2, 16, device=_device(), requires_grad=True)
        layer(x).sum().backward()
    except Exception as err:
        return (f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit NF4 on {_device()} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'})")
    return None


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quantize_llm(llm: nn.Module) -> int:
    """Every linear layer of the LLM's decoder layers as a bitsandbytes NF4 ``Linear4bit`` holding the same weights
    (quantized where they are); embeddings, norms and the LM head stay as they are. The layers replaced."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(llm.named_modules()):
        if not re.fullmatch(r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+", name) or type(module) is not nn.Linear:
            continue
        weight = module.weight
        quant = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        quant.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            quant.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        quant = quant.to(weight.device)  # bitsandbytes quantizes on the move
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weights for inference at the first forward in eval mode
        # (validation, generation), and the repacked layer then fails the next training forward: keep one layout.
        quant.support_avx512bf16_for_cpu = False
        owner, _, attr = name.rpartition(".")
        setattr(llm.get_submodule(owner), attr, quant)
        count += 1
    return count


# -- building ----------------------------------------------------------------------------------------------------
def lora_config(settings: LoraSettings, regex: str, base: str | None):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.scale_alpha, lora_dropout=float(settings.dropout),
                      target_modules=regex, bias="none", base_model_name_or_path=base)


def inject(module: nn.Module, config) -> None:
    """peft's adapters into ``module`` in place (float32 adapters on a 16-bit base, as PeftModel makes them)."""
    from peft.functional import cast_adapter_dtype, inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    cast_adapter_dtype(module, ADAPTER_NAME, autocast_adapter_dtype=True)


def apply_lora(model: AdaptableModel, settings: LoraSettings, base: str | None) -> LoraInfo:
    """Adapters on ``model`` as ``settings`` say (QLoRA: the LLM quantized first); sets and returns ``model.lora``."""
    settings.check()
    if settings.qlora:
        reason = qlora_refusal()
        if reason is not None:
            raise SettingsError(f"model.lora.qlora: 4-bit NF4 is not available: {reason}; leave qlora false for "
                                "plain LoRA")
    plan = plan_targets(model, settings)
    digest = base_digest(model, plan)
    if settings.qlora:
        quantized = quantize_llm(model.llm)
        log.info("QLoRA: %d LLM linear layers stored in 4-bit NF4", quantized)
    for module_name, (regex, names) in plan.items():
        inject(getattr(model, module_name), lora_config(settings, regex, base))
        log.info("LoRA r=%d alpha=%g on %d layers of %s", settings.r, settings.scale_alpha, len(names), module_name)
    model.lora = LoraInfo(settings, base, digest)
    return model.lora


def attach_like(copy: AdaptableModel, model: AdaptableModel) -> None:
    """The adapters ``model`` holds, injected into ``copy`` (same structure, same names; weights not copied)."""
    for module_name in ADAPTED_MODULES:
        config = getattr(getattr(model, module_name), "peft_config", {}).get(ADAPTER_NAME)
        if config is not None:
            inject(getattr(copy, module_name), config)
    copy.lora = model.lora


# -- files -------------------------------------------------------------------------------------------------------
def save_adapter(model: AdaptableModel, out: str | Path) -> Path:
    """Write ``model``'s adapters in PEFT's format, its stored parts and the manifest into ``out``."""
    from peft.functional import get_peft_model_state_dict
    from safetensors.torch import save_file

    info: LoraInfo = model.lora
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapters = {}
    for module_name in ADAPTED_MODULES:
        module = getattr(model, module_name)
        config = getattr(module, "peft_config", {}).get(ADAPTER_NAME)
        if config is None:
            continue
        folder = out / ADAPTER_DIRS[module_name]
        folder.mkdir(exist_ok=True)
        config.base_model_name_or_path = info.base
        config.save_pretrained(str(folder))
        state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        adapters[module_name] = ADAPTER_DIRS[module_name]
    parts = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
             if part_of(n) in info.parts and not is_adapter(n)}
    save_file(parts, str(out / PARTS_NAME), metadata={"format": "pt"})
    manifest = {"format": FORMAT, "base": info.base, "base_digest": info.digest, "lora": asdict(info.settings),
                "adapters": adapters, "parts": list(info.parts), "resize_policy": model.config.resize_policy}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path, key: str = "adapter") -> dict[str, Any]:
    """The manifest of an adapter folder; a bare PEFT folder (no manifest) is read as an LLM adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{key}: no adapter folder at {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            return {"format": FORMAT, "base": None, "base_digest": None, "adapters": {"llm": "."}, "parts": []}
        raise SettingsError(f"{key}: {folder} is not an adapter folder (no {MANIFEST_NAME} or {ADAPTER_CONFIG}); "
                            "a LoRA run's export is one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{key}: {path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SettingsError(f"{key}: {path} is not a {FORMAT} manifest")
    return manifest


def _adapter_configs(folder: Path, manifest: dict[str, Any], key: str) -> dict[str, Any]:
    from peft import LoraConfig

    configs = {}
    for module_name, sub in manifest.get("adapters", {}).items():
        if module_name not in ADAPTED_MODULES:
            raise SettingsError(f"{key}: {folder / MANIFEST_NAME} names an adapter for {module_name!r}, not one of "
                                f"{ADAPTED_MODULES}")
        where = folder / sub
        if not (where / ADAPTER_CONFIG).is_file() or not (where / ADAPTER_WEIGHTS).is_file():
            raise MissingFileError(f"{key}: {where} lacks {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}")
        try:
            config = LoraConfig.from_pretrained(str(where))
        except (ValueError, TypeError, OSError, json.JSONDecodeError) as err:
            raise SettingsError(f"{key}: {where / ADAPTER_CONFIG} is not a LoRA config ({err})") from err
        configs[module_name] = (config, where)
    return configs


def check_base(model: AdaptableModel, folder: Path, manifest: dict[str, Any], configs: dict[str, Any],
               key: str) -> None:
    """Refuse an adapter made for another base: a target layer this model lacks, or other base weights."""
    plan = {}
    for module_name, (config, _) in configs.items():
        regex = config.target_modules if isinstance(config.target_modules, str) else None
        module = getattr(model, module_name)
        linears = {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}
        if regex is None:  # a list of leaf names (a PEFT folder from elsewhere)
            names = sorted(n for n in linears if n.rpartition(".")[2] in set(config.target_modules or ()))
        else:
            names = sorted(n for n in linears if re.fullmatch(regex, n))
        if not names:
            raise SettingsError(f"{key}: {folder} does not fit this base: its {module_name} adapter targets "
                                f"{config.target_modules!r}, which match no layer of this model")
        plan[module_name] = (regex, names)
    expected = manifest.get("base_digest")
    if expected:
        found = base_digest(model, plan)
        if found is not None and found != expected:
            raise SettingsError(f"{key}: {folder} was trained on another base ({manifest.get('base')}, weights "
                                f"digest {expected}); this base's adapted weights give {found}")


def load_adapter(model: AdaptableModel, folder: str | Path, key: str = "adapter") -> LoraInfo:
    """``folder``'s adapters onto ``model`` without merging (the structure training used) and its stored parts."""
    from peft.functional import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder, key)
    configs = _adapter_configs(folder, manifest, key)
    check_base(model, folder, manifest, configs, key)
    for module_name, (config, where) in configs.items():
        module = getattr(model, module_name)
        try:
            inject(module, config)
            state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(where / ADAPTER_WEIGHTS)).items()}
            result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
        except (ValueError, RuntimeError) as err:  # target not found, shape mismatch: another base
            raise SettingsError(f"{key}: {where} does not fit this base ({str(err).splitlines()[0][:300]})") from err
        if getattr(result, "unexpected_keys", None):
            raise SettingsError(f"{key}: {where} holds tensors this base has no place for: "
                                f"{', '.join(result.unexpected_keys[:4])}")
    parts_file = folder / PARTS_NAME
    if parts_file.is_file():
        parts = load_file(str(parts_file))
        own = dict(model.named_parameters())
        wrong = [k for k, v in parts.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
        if wrong:
            raise SettingsError(f"{key}: {parts_file} does not fit this base: {', '.join(wrong[:4])}")
        with torch.no_grad():
            for k, v in parts.items():
                own[k].copy_(v)
    if manifest.get("resize_policy"):
        model.config.resize_policy = manifest["resize_policy"]
    lora = manifest.get("lora") or {}
    settings = as_lora_settings({k: v for k, v in lora.items() if k in {f.name for f in fields(LoraSettings)}})
    if not lora:  # a bare PEFT folder
        config = configs["llm"][0]
        settings = LoraSettings(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    model.lora = LoraInfo(settings, manifest.get("base"), manifest.get("base_digest"), tuple(manifest.get("parts", ())))
    return model.lora


def merge_adapter(model: AdaptableModel, folder: str | Path, key: str = "--adapter") -> AdaptableModel:
    """``folder``'s adapters merged into ``model``'s weights through ``peft.PeftModel.from_pretrained(...)
    .merge_and_unload()``, and its stored parts loaded: a plain model (no adapter layers)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder, key)
    configs = _adapter_configs(folder, manifest, key)
    check_base(model, folder, manifest, configs, key)
    for module_name, (_, where) in configs.items():
        try:
            peft_model = PeftModel.from_pretrained(getattr(model, module_name), str(where), is_trainable=False)
        except (ValueError, RuntimeError) as err:
            raise SettingsError(f"{key}: {where} does not fit this base ({str(err).splitlines()[0][:300]})") from err
        setattr(model, module_name, peft_model.merge_and_unload())
        merged = getattr(model, module_name)
        if hasattr(merged, "peft_config"):
            del merged.peft_config
    parts_file = folder / PARTS_NAME
    if parts_file.is_file():
        result = model.load_state_dict(load_file(str(parts_file)), strict=False)
        if result.unexpected_keys:
            raise SettingsError(f"{key}: {parts_file} does not fit this base: {', '.join(result.unexpected_keys[:4])}")
    if manifest.get("resize_policy"):
        model.config.resize_policy = manifest["resize_policy"]
    model.lora = None
    return model


def trained_parameter_names(named: Iterable[tuple[str, nn.Parameter]], parts: Iterable[str],
                            adapted: set[str]) -> list[str]:
    """Names of the parameters the optimizer holds: adapters, and every parameter of a trained part without
    adapters."""
    parts = set(parts)
    return [n for n, _ in named if trains(n, part_of(n), part_of(n) in parts, adapted)]
