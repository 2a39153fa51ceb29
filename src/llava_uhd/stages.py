"""The three LLaVA-UHD v3 training stages as one LightningModule base (DESIGN.md section 3).

A stage differs from another only in which parts train, which loss terms it uses and its learning rates:

| stage | class | trains | extra loss |
| --- | --- | --- | --- |
| 1 pre-alignment | :class:`PreAlignment` | patch embed, WTC, projector | optional feature distillation |
| 2 pretrain | :class:`Pretrain` | ViT + projector | |
| 3 SFT | :class:`SFT` | everything | |

Parts are named ``patch_embed`` (patch kernel + pos-embed), ``wtc``, ``vit`` (the rest of the encoder),
``projector`` and ``llm``. Freezing is done by ``callbacks.PreAlignmentFreeze`` from :attr:`frozen_parts`,
before any strategy wraps the model. ``init_from`` loads weights only (a Lightning ``.ckpt`` or an exported
model folder); resuming a run is the CLI's ``--ckpt_path``. With ``llm`` left empty, ``init_from`` names a model
folder (ours or the LLaVA-format release) that gives the whole model: architecture, weights and tokenizer
(``configs/release.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .checkpoint_io import UNREADABLE, unreadable_checkpoint
from .errors import SettingsError
from .llm import tiny_qwen2_config
from .metrics import VQAMetrics, plot_cell_accuracy
from .mllm import WEIGHTS_NAME, LlavaUHD, LlavaUHDConfig
from .release import is_release_folder
from .tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)

PARTS = ("patch_embed", "wtc", "vit", "projector", "llm")
Pooling = Literal["avg", "content_adaptive", "pixel_unshuffle"]


def part_of(name: str) -> str:
    """Which part a parameter of :class:`LlavaUHD` (named as in ``named_parameters``) belongs to."""
    if name.startswith("llm."):
        return "llm"
    if name.startswith("projector."):
        return "projector"
    inner = name.split(".", 1)[1] if name.startswith("encoder.") else name
    inner = inner.removeprefix("base.")  # the slice-based encoder wraps a ViT
    if inner.startswith(("patch_embed.", "pos_embed")):
        return "patch_embed"
    if inner.startswith("wtc."):
        return "wtc"
    return "vit"


def check_llm_keys(llm: dict[str, Any]) -> None:
    """A config-dict ``model.llm`` whose keys its transformers config knows: a typo (``num_hiden_layers``)
    would otherwise be kept as an unused attribute and the model built with the default instead. A key is
    unknown when the config class keeps it as a loose attribute that its default instance does not have."""
    import difflib

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
            raise ValueError("model.tokenizer: a config-dict LLM needs a tokenizer directory")
        check_llm_keys(llm)
        tok = build_tiny_tokenizer(tokenizer)
        llm = {**tiny_qwen2_config(len(tok)), **llm} if "model_type" not in llm else {"vocab_size": len(tok), **llm}
    elif not Path(llm).is_dir():
        raise FileNotFoundError(f"model.llm: no local LLM directory at {llm!r} (nothing is downloaded)")
    if tokenizer and not isinstance(llm, dict) and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"model.tokenizer: no tokenizer directory at {tokenizer!r}")
    config = LlavaUHDConfig(
        encoder=encoder, encoder_kwargs=encoder_kwargs, projector=projector, llm=llm, tokenizer=tokenizer,
        llm_dtype=llm_dtype, vision_markers=vision_markers,
    )
    return LlavaUHD(config)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a Lightning checkpoint or an exported model folder, never unpickling objects."""
    path = Path(path)
    if path.is_dir() and is_release_folder(path):
        raise ValueError(f"model.init_from: {path} is a LLaVA-format release; leave model.llm empty so that the "
                         "folder gives the whole model (configs/release.yaml)")
    if path.is_dir():
        file = path / WEIGHTS_NAME
        if not file.is_file():
            raise FileNotFoundError(f"model.init_from: {path} has no {WEIGHTS_NAME} (not an exported model folder)")
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise unreadable_checkpoint("model.init_from", file, err) from err
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no checkpoint at {path}")
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except UNREADABLE as err:
        raise unreadable_checkpoint("model.init_from", path, err) from err
    if not isinstance(checkpoint, dict):
        raise SettingsError(f"model.init_from: {path} holds a {type(checkpoint).__name__}, not a checkpoint")
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")} or state


def check_learning_rates(lr: dict[str, float] | None) -> dict[str, float]:
    """``model.lr`` with every key a part name and every value a positive number (a typo is an error, not a
    setting that silently does nothing)."""
    lr = dict(lr or {})
    unknown = sorted(set(lr) - set(PARTS))
    if unknown:
        raise SettingsError(f"model.lr: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    for part, value in lr.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise SettingsError(f"model.lr.{part}: a positive learning rate, got {value!r}")
    return {part: float(value) for part, value in lr.items()}


class UHDModule(L.LightningModule):
    """LLaVA-UHD v3 training module; subclasses fix the stage's defaults."""

    stage: ClassVar[str] = "custom"
    default_trainable: ClassVar[tuple[str, ...]] = PARTS
    default_lr: ClassVar[dict[str, float]] = {
        "patch_embed": 1e-5, "wtc": 1e-5, "vit": 1e-5, "projector": 2e-5, "llm": 2e-5,
    }

    def __init__(
        self,
        encoder: str = "vit_uhd_so400m_patch10_siglip",
        encoder_weights: str | None = None,
        patch_size: int | None = None,
        wtc_layers: list[int] | None = None,
        wtc_pooling: Pooling | None = None,
        pos_embed_init: Literal["random", "sincos"] | None = None,
        projector: Literal["mlp", "merger"] = "mlp",
        llm: str | dict[str, Any] = "",
        tokenizer: str | None = None,
        llm_dtype: str | None = None,
        vision_markers: bool = False,
        resize_policy: Literal["default", "release"] | None = None,
        init_from: str | None = None,
        reinit_wtc_gate: bool = False,
        trainable: list[str] | None = None,
        lr: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        betas: tuple[float, float] = (0.9, 0.999),
        gradient_checkpointing: bool = False,
        distill_weight: float = 0.0,
        eval_generate: bool = True,
        max_new_tokens: int = 16,
        num_beams: int = 1,
    ) -> None:
        """
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
            trainable: parts to train (default: the stage's); the others are frozen.
            lr: learning rate per part (merged over the stage's defaults).
            weight_decay: AdamW weight decay, applied to tensors with 2+ dims only.
            warmup_ratio: linear warm-up share of the steps before the cosine decay.
            betas: AdamW betas.
            gradient_checkpointing: recompute ViT blocks and LLM layers in backward.
            distill_weight: stage 1 feature distillation weight (0 = off).
            eval_generate: generate answers in validate/test to compute the VQA metrics.
            max_new_tokens: generation length cap for validate/test/predict.
            num_beams: beams for generation (the paper evaluates with 3).
        """
        super().__init__()
        self.save_hyperparameters()
        encoder_kwargs: dict[str, Any] = {}
        if encoder_weights is not None:
            if not Path(encoder_weights).is_file():
                raise FileNotFoundError(f"model.encoder_weights: no weights file at {encoder_weights!r}")
            encoder_kwargs["pretrained_path"] = encoder_weights
        overrides = {"patch_size": patch_size, "wtc_layers": wtc_layers, "wtc_pooling": wtc_pooling,
                     "pos_embed_init": pos_embed_init}
        for key, value in overrides.items():
            if value is not None:
                encoder_kwargs[key] = tuple(value) if key == "wtc_layers" else value
        if init_from and not llm:  # the folder is the whole model (ours or a release)
            if not Path(init_from).is_dir():
                raise FileNotFoundError(f"model.init_from: with model.llm empty, a model folder is needed; "
                                        f"no folder at {init_from!r}")
            try:
                self.model = LlavaUHD.from_pretrained(init_from)
            except (ValueError, OSError) as err:  # a folder that is not a model, a damaged release, ...
                raise ValueError(f"model.init_from: {err}") from err
            if llm_dtype:
                self.model.llm.to(getattr(torch, llm_dtype))
            log.info("model built from %s (encoder %s, projector %s)", init_from, self.model.config.encoder,
                     self.model.config.projector)
        else:
            if not llm:
                raise ValueError("model.llm: empty; give a local LLM directory, or a model folder as model.init_from "
                                 "(configs/release.yaml)")
            try:
                self.model = build_llava_uhd(encoder, llm, tokenizer, projector, encoder_kwargs, llm_dtype,
                                             vision_markers)
            except ValueError as err:  # name the CLI key for encoder settings rejected by the config dataclass
                message = str(err)
                for key in overrides:
                    if message.startswith(key):
                        raise ValueError(f"model.{message}") from err
                raise
            if init_from:
                self.load_weights(init_from)
        if resize_policy is not None:
            self.model.config.resize_policy = resize_policy
        if reinit_wtc_gate:
            self.reinit_wtc_gates()
        self.trainable_parts = tuple(trainable if trainable is not None else self.default_trainable)
        unknown = set(self.trainable_parts) - set(PARTS)
        if unknown:
            raise ValueError(f"model.trainable: unknown parts {sorted(unknown)}; parts are {PARTS}")
        if distill_weight < 0:
            raise SettingsError(f"model.distill_weight: 0 (off) or more, got {distill_weight}")
        if max_new_tokens < 1:
            raise SettingsError(f"model.max_new_tokens: at least 1, got {max_new_tokens}")
        self.lrs = {**self.default_lr, **check_learning_rates(lr)}
        self.teacher = self._build_teacher() if distill_weight > 0 else None
        if gradient_checkpointing:
            self.model.encoder.set_grad_checkpointing(True)
            self.model.llm.gradient_checkpointing_enable()
        self.nonfinite_steps = 0
        self.skipping_step = False  # True from a skipped non-finite training_step to the end of its backward
        self.metrics = nn.ModuleDict({"val": VQAMetrics(), "test": VQAMetrics()})

    # -- parts ---------------------------------------------------------------------------------------------------
    @property
    def frozen_parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p not in self.trainable_parts)

    def part_parameters(self, part: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs of one part, names relative to ``self.model``."""
        return [(n, p) for n, p in self.model.named_parameters() if part_of(n) == part]

    def reinit_wtc_gates(self) -> list[str]:
        """Fresh content-adaptive WTC gates (W1 random, b1 / W2 / b2 zero: exact average pooling, live gradient)."""
        from llava_uhd.vision.pvc import WindowedTokenCompression

        names = [n for n, m in self.model.named_modules()
                 if isinstance(m, WindowedTokenCompression) and m.pooling == "content_adaptive"]
        if not names:
            raise ValueError("model.reinit_wtc_gate: the encoder has no content-adaptive WTC gate")
        for name in names:
            self.model.get_submodule(name).reset_parameters()
        log.info("reinit_wtc_gate: %d WTC gates re-initialised (%s)", len(names), ", ".join(names))
        return names

    def load_weights(self, path: str | Path) -> None:
        state = read_weights(path)
        result = self.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            log.warning("init_from %s: unused tensors %s", path, ", ".join(result.unexpected_keys))
        # A tied tensor (the LLM's input embedding and LM head) is stored once: the copy that is not in the file
        # shares its storage with one that is, so it was loaded too.
        current = self.model.state_dict()
        loaded = {current[k].data_ptr() for k in state if k in current}
        left = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]
        if left:
            log.warning("init_from %s: tensors left at init %s", path, ", ".join(left))
        log.info("initialised weights from %s (%d tensors)", path, len(state))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "bind_model"):
            datamodule.bind_model(self.model)

    # -- distillation (stage 1) ------------------------------------------------------------------------------------
    def _build_teacher(self) -> nn.Module:
        """A frozen copy of the encoder without WTC: the uncompressed features WTC should preserve."""
        cfg = getattr(self.model.encoder, "cfg", None)
        if cfg is None or not cfg.wtc_layers:
            raise ValueError("model.distill_weight: distillation needs a ViT-UHD encoder with WTC layers")
        kwargs = {k: v for k, v in self.model.config.encoder_kwargs.items() if k != "pretrained_path"}
        teacher = timm.create_model(self.hparams.encoder, **{**kwargs, "wtc_layers": ()})
        teacher.load_state_dict(self.model.encoder.state_dict(), strict=False)
        teacher.requires_grad_(False).eval()
        return teacher

    def distill_loss(self, student: Any, pixel_values) -> torch.Tensor:
        """Cosine distance between student tokens and teacher tokens average-pooled to the student grids."""
        with torch.no_grad():
            teacher = self.teacher(self.model.encoder_input(pixel_values))
        factor = 2 ** len(self.model.encoder.cfg.wtc_layers)
        tokens = teacher.tokens.reshape(-1, teacher.tokens.shape[-1])
        pooled, start = [], 0
        for h, w in teacher.grids:
            grid = tokens[start : start + h * w].T.reshape(1, -1, h, w)
            pooled.append(F.avg_pool2d(grid, factor).flatten(2)[0].T)
            start += h * w
        target = torch.cat(pooled)
        ours = student.tokens.reshape(-1, student.tokens.shape[-1])
        return (1 - F.cosine_similarity(ours.float(), target.float(), dim=-1)).mean()

    # -- steps ---------------------------------------------------------------------------------------------------
    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixel_values = batch.get("pixel_values")
        has_images = pixel_values is not None and len(pixel_values) > 0 and pixel_values[0].numel() > 0
        if self.teacher is None:  # one call through LlavaUHD.forward: under FSDP2 that is the root's forward
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             labels=batch["labels"], pixel_values=pixel_values if has_images else None)
            return out.loss, {"lm_loss": out.loss}
        encoder_out = self.model.run_encoder(pixel_values) if has_images else None
        visual = self.model.project(encoder_out) if has_images else None
        sizes = batch.get("image_sizes") or []
        embeds = self.model.splice(batch["input_ids"], visual, sizes)
        out = self.model.llm(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                             labels=batch["labels"], use_cache=False)
        terms = {"lm_loss": out.loss}
        if not has_images:
            return out.loss, terms
        terms["distill_loss"] = self.distill_loss(encoder_out, pixel_values)
        return out.loss + self.hparams.distill_weight * terms["distill_loss"], terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, terms = self._forward(batch)
        batch_size = batch["input_ids"].shape[0]
        self._log_skips(batch)
        bad = not bool(torch.isfinite(loss.detach()))
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:  # every rank skips together: no update, weights and optimizer state untouched
            self.nonfinite_steps += 1
            log.warning("step %d: non-finite loss, batch skipped (%d so far)", self.global_step, self.nonfinite_steps)
            self.log("train/nonfinite_skipped", float(self.nonfinite_steps), batch_size=batch_size)
            if self.trainer.world_size == 1:
                return None  # no backward, no optimizer step
            # Lightning refuses a None step on several ranks: every rank back-propagates a zero (DDP's all-reduce
            # and FSDP's reduce-scatter run as usual, nobody waits), then on_after_backward drops the gradients,
            # so the optimizer skips every parameter (AdamW leaves parameters without a gradient alone).
            self.skipping_step = True
            return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def on_after_backward(self) -> None:
        # Callbacks' on_after_backward run before this one: they see skipping_step and should ignore such gradients.
        if self.skipping_step:  # a non-finite step under several ranks (training_step)
            for param in self.parameters():
                param.grad = None
            self.skipping_step = False

    def _log_skips(self, batch: dict) -> None:
        skips = batch.get("skips") or {}
        for reason, count in skips.items():
            if count:
                self.log(f"data/skipped/{reason}", float(count), reduce_fx="sum", on_step=False, on_epoch=True,
                         batch_size=1, sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict, split: str) -> None:
        if batch.get("input_ids") is None:  # a benchmark-TSV batch whose every image was unreadable (logged)
            return
        loss, _ = self._forward(batch)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", batch_size=batch["input_ids"].shape[0],
                 sync_dist=True)
        if self._generates():
            records = self.answer(batch)
            scored = [(r["answer"], m) for r, m in zip(records, batch["meta"]) if m.get("answer") is not None]
            if scored:
                self.metrics[split].update([p for p, _ in scored], [m for _, m in scored])
            rows = [(r["answer"], m["index"]) for r, m in zip(records, batch["meta"]) if m.get("benchmark")]
            if rows:
                self.benchmark_metric(split).update([p for p, _ in rows], [i for _, i in rows])

    def benchmark_metric(self, split: str):
        """``BenchmarkScores`` over the benchmark TSV this split's loader reads (``datamodules.tsv``), made on
        first use: benchmark rows are scored as ``python -m llava_uhd.eval score`` scores them."""
        name = f"benchmark_{split}"
        if not hasattr(self, name):
            from .metrics import BenchmarkScores

            loader = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
            benchmark = getattr(getattr(loader, "dataset", None), "benchmark", None)
            if benchmark is None:
                raise ValueError(f"{split} batch rows name a benchmark, but the {split} loader reads no benchmark TSV")
            setattr(self, name, BenchmarkScores(benchmark).to(self.device))
        return getattr(self, name)

    def _generates(self) -> bool:
        """Generation in validate/test: off under FSDP2, where ranks would run unequal numbers of forwards."""
        if not self.hparams.eval_generate:
            return False
        if getattr(self, "device_mesh", None) is not None:
            if not getattr(self, "_warned_generation", False):
                log.warning("eval_generate is skipped under a sharded strategy: validation reports the loss only")
                self._warned_generation = True
            return False
        return True

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, split: str) -> None:
        scores = getattr(self, f"benchmark_{split}", None)
        if self._generates() and scores is not None and scores.update_called:
            values = scores.compute()
            self.log_dict({f"{split}/{scores.benchmark.name}/{k}": v for k, v in values.items()}, sync_dist=False)
            scores.reset()
        metric = self.metrics[split]
        if not self._generates() or not metric.update_called:
            return
        values = metric.compute()
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, sync_dist=False)
        experiment = getattr(self.logger, "experiment", None)
        for task in metric.cell_tasks():
            cells = metric.cell_accuracy(task)
            if self.trainer.is_global_zero and hasattr(experiment, "add_figure"):
                figure = plot_cell_accuracy(cells, f"{split} {task}: accuracy per grid cell")
                experiment.add_figure(f"{split}/cell_accuracy/{task}", figure, self.global_step)
        metric.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        return self.answer(batch)

    def answer(self, batch: dict) -> list[dict[str, Any]]:
        """Generate an answer for each sample of a batch: prompt = the conversation up to its first reply."""
        from .conversation import normalize_turns

        records = []
        images = self._images_per_sample(batch)
        keys = batch.get("keys") or [None] * len(images)
        for key, meta, sample_images in zip(keys, batch.get("meta", []), images):
            question = meta.get("question") or meta.get("prompt") or ""
            if not question and meta.get("conversations"):
                question = normalize_turns(meta["conversations"])[0]["content"]
            result = self.model.generate(sample_images, question, max_new_tokens=self.hparams.max_new_tokens,
                                         num_beams=self.hparams.num_beams)
            records.append({
                "key": key, "task": meta.get("task"), "prompt": question, "answer": result.text,
                "reference": meta.get("answer"), "encoder_ms": result.encoder_ms, "prefill_ms": result.prefill_ms,
                "ttft_ms": result.ttft_ms, "decode_tokens_per_s": result.decode_tokens_per_s,
            })
        return records

    @staticmethod
    def _images_per_sample(batch: dict) -> list[list[torch.Tensor]]:
        pixels = batch.get("pixel_values")
        images = [] if pixels is None or len(pixels) == 0 or pixels[0].numel() == 0 else list(pixels)
        out, start = [], 0
        for n in batch.get("images_per_sample", [0] * len(batch.get("meta", []))):
            out.append(images[start : start + n])
            start += n
        return out

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        groups = []
        scheduled = getattr(self, "scheduled_parts", ())  # frozen now, unfrozen later by PreAlignmentFreeze
        for part in PARTS:
            params = self.part_parameters(part)
            if (part not in self.trainable_parts and part not in scheduled) or not params:
                continue
            lr = self.lrs.get(part)
            if lr is None:
                raise ValueError(f"model.lr: no learning rate for trained part {part!r}")
            decay = [p for _, p in params if p.ndim >= 2]
            no_decay = [p for _, p in params if p.ndim < 2]
            for suffix, tensors, wd in (("", decay, self.hparams.weight_decay), ("/no_decay", no_decay, 0.0)):
                if tensors:
                    groups.append({"params": tensors, "lr": lr, "weight_decay": wd, "name": part + suffix})
        if not groups:
            raise ValueError("model.trainable: nothing to train")
        optimizer = torch.optim.AdamW(groups, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(round(self.hparams.warmup_ratio * total))
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each ViT block and each LLM decoder layer, then the root.

        Frozen parts are sharded like the rest; they get no gradients and no optimizer state. Training runs
        through ``LlavaUHD.forward`` so that the root unshards its own parameters (patch embedding, WTC,
        projector, embeddings, LM head) for the step; the piecewise distillation path does not, hence the error.
        """
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        if self.teacher is not None:
            raise ValueError("model.distill_weight: feature distillation is not supported under FSDP2 "
                             "(ModelParallelStrategy); use DDP or FSDPStrategy for stage 1 with distillation")

        data_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        vit = getattr(self.model.encoder, "base", self.model.encoder)
        for block in vit.blocks:
            fully_shard(block, mesh=data_mesh)
        for layer in self.model.llm.model.layers:
            fully_shard(layer, mesh=data_mesh)
        fully_shard(self.model, mesh=data_mesh)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps  # a resumed run keeps counting skipped batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))


class PreAlignment(UHDModule):
    """Stage 1: train patch embedding, WTC and projector on captions; LLM and ViT blocks frozen."""

    stage = "stage1"
    default_trainable = ("patch_embed", "wtc", "projector")
    default_lr = {"patch_embed": 1e-4, "wtc": 1e-4, "projector": 1e-3}


class Pretrain(UHDModule):
    """Stage 2: train the ViT and projector on captions / OCR; LLM frozen."""

    stage = "stage2"
    default_trainable = ("patch_embed", "wtc", "vit", "projector")
    default_lr = {"patch_embed": 1e-5, "wtc": 1e-5, "vit": 1e-5, "projector": 2e-4}


class SFT(UHDModule):
    """Stage 3: train everything on instruction data."""

    stage = "stage3"
    default_trainable = PARTS
    default_lr = {"patch_embed": 1e-5, "wtc": 1e-5, "vit": 1e-5, "projector": 2e-5, "llm": 2e-5}
