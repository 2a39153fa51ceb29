"""The three LLaVA-UHD v3 training stages as one LightningModule base (docs/design.md, "Stages, parts and freezing").

A stage differs from another only in which parts train, which loss terms it uses and its learning rates:

| stage | class | trains | extra loss |
| --- | --- | --- | --- |
| 1 pre-alignment | :class:`PreAlignment` | patch embed, WTC, projector | optional feature distillation |
| 2 pretrain | :class:`Pretrain` | ViT + projector | |
| 3 SFT | :class:`SFT` | everything | |

Parts are named ``patch_embed`` (patch kernel + pos-embed), ``wtc``, ``vit`` (the rest of the encoder),
``projector`` and ``llm``. Freezing is done by ``callbacks.StageFreeze`` from :attr:`frozen_parts`,
before any strategy wraps the model. ``init_from`` loads weights only (a Lightning ``.ckpt`` or an exported
model folder); resuming a run is the CLI's ``--ckpt_path``. With ``llm`` left empty, ``init_from`` names a model
folder (ours or the LLaVA-format release) that gives the whole model: architecture, weights and tokenizer
(``configs/release.yaml``).

The module is handed its parts: the model comes from :func:`llava_uhd.build.build_model`, the distillation
teacher from :mod:`llava_uhd.distill`, non-finite step skipping from :mod:`llava_uhd.nonfinite`, generated answers
from :mod:`llava_uhd.eval.generation` and their scores from :class:`llava_uhd.metrics.GenerationScores`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .build import ModelSettings, build_model, fully_shard_model
from .distill import build_teacher, distill_forward
from .errors import SettingsError
from .eval.generation import answer_samples
from .lora import adapted_parts, trained_parameter_names
from .metrics import GenerationScores
from .nonfinite import NonFiniteSkip
from .parts import PARTS, part_of

log = logging.getLogger(__name__)


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


def part_param_groups(
    named: Iterable[tuple[str, nn.Parameter]], parts: Iterable[str], lrs: dict[str, float], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups named by part, at the part's learning rate, with weight decay on tensors of 2+ dims only
    (``<part>/no_decay`` holds the others).

    Not ``timm.optim.param_groups_weight_decay``: it leaves out tensors that do not require a gradient (a part
    ``StageFreeze`` unfreezes later must be in the optimizer from the start), it groups one module (a
    part is a set of names across modules), and at weight decay 0 it makes one group where this makes two, so
    the learning-rate curves would be renamed."""
    named = list(named)
    groups = []
    for part in parts:
        params = [p for n, p in named if part_of(n) == part]
        if not params:
            continue
        lr = lrs.get(part)
        if lr is None:
            raise SettingsError(f"model.lr: no learning rate for trained part {part!r}")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, tensors, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if tensors:
                groups.append({"params": tensors, "lr": lr, "weight_decay": wd, "name": part + suffix})
    return groups


class UHDModule(L.LightningModule):
    """LLaVA-UHD v3 training module; subclasses fix the stage's defaults."""

    stage: ClassVar[str] = "custom"
    default_trainable: ClassVar[tuple[str, ...]] = PARTS
    default_lr: ClassVar[dict[str, float]] = {
        "patch_embed": 1e-5, "wtc": 1e-5, "vit": 1e-5, "projector": 2e-5, "llm": 2e-5,
    }

    def __init__(
        self,
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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        **model_settings: Any,
    ) -> None:
        """
        Args:
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
            optimizer: the optimizer class (``class_path`` + ``init_args``; default AdamW with ``betas``). It gets the
                per-part parameter groups, whose ``lr`` (``model.lr``) and ``weight_decay`` win over its own.
            lr_scheduler: the schedule (``class_path`` + ``init_args``, stepped every optimizer step; default:
                linear warm-up for ``warmup_ratio`` of the steps, then cosine decay to 0).
            model_settings: the model, one flat key per field of :class:`llava_uhd.build.ModelSettings`
                (``encoder``, ``wtc_pooling``, ``llm``, ``init_from``, ...), declared and documented there; the CLI
                reads them from it, so ``--model.wtc_pooling avg`` is one override.
        """
        super().__init__()
        settings = ModelSettings(**model_settings)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])  # callables: checkpoints hold plain data
        self.hparams.update(asdict(settings))  # every model key, defaults included, as the CLI would pass them
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.model = build_model(settings)
        self.trainable_parts = tuple(trainable if trainable is not None else self.default_trainable)
        unknown = set(self.trainable_parts) - set(PARTS)
        if unknown:
            raise SettingsError(f"model.trainable: unknown parts {sorted(unknown)}; parts are {PARTS}")
        if distill_weight < 0:
            raise SettingsError(f"model.distill_weight: 0 (off) or more, got {distill_weight}")
        if max_new_tokens < 1:
            raise SettingsError(f"model.max_new_tokens: at least 1, got {max_new_tokens}")
        self.lrs = {**self.default_lr, **check_learning_rates(lr)}
        self.teacher = build_teacher(self.model, settings.encoder) if distill_weight > 0 else None
        if self.model.lora is not None:
            # a LoRA checkpoint holds only what trains (the base is rebuilt from the settings): see on_save_checkpoint
            self.strict_loading = False
            self.model.lora.parts = self.stored_parts(self.trainable_parts)
        if gradient_checkpointing:
            self.model.encoder.set_grad_checkpointing(True)
            self.model.llm.gradient_checkpointing_enable()
        self.nonfinite = NonFiniteSkip()
        self.scores = GenerationScores()

    # -- parts ---------------------------------------------------------------------------------------------------
    @property
    def frozen_parts(self) -> tuple[str, ...]:
        return tuple(p for p in PARTS if p not in self.trainable_parts)

    def part_parameters(self, part: str) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs of one part, names relative to ``self.model``."""
        return [(n, p) for n, p in self.model.named_parameters() if part_of(n) == part]

    @property
    def nonfinite_steps(self) -> int:
        """Training batches skipped for a non-finite loss in this run (resumed runs included)."""
        return self.nonfinite.count

    @property
    def skipping_step(self) -> bool:
        """True from a skipped non-finite step (several ranks) to the end of its backward: callbacks' gradient
        checks should ignore that backward's (zero) gradients."""
        return self.nonfinite.pending

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "bind_model"):
            datamodule.bind_model(self.model)

    # -- steps ---------------------------------------------------------------------------------------------------
    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixel_values = batch.get("pixel_values")
        if pixel_values is None or len(pixel_values) == 0 or pixel_values[0].numel() == 0:
            pixel_values = None  # a text-only batch
        if self.teacher is not None:  # piecewise: the encoder's tokens feed the distillation loss too
            return distill_forward(self.model, self.teacher, batch, pixel_values, self.hparams.distill_weight)
        # one call through LlavaUHD.forward: under FSDP2 that is the root's forward
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         labels=batch["labels"], pixel_values=pixel_values)
        return out.loss, {"lm_loss": out.loss}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss, terms = self._forward(batch)
        batch_size = batch["input_ids"].shape[0]
        self._log_skips(batch)
        if self.nonfinite.skip(self, loss, batch_size):  # every rank skips together: weights and state untouched
            return self.nonfinite.skipped_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def on_after_backward(self) -> None:
        # Callbacks' on_after_backward run before this one: they see skipping_step and should ignore such gradients.
        self.nonfinite.drop_gradients(self)

    def _log_skips(self, batch: dict) -> None:
        for reason, count in (batch.get("skips") or {}).items():
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
            loader = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
            self.scores.update(split, self.answer(batch), batch["meta"], loader)

    def _generates(self) -> bool:
        """Generation in validate/test: off under FSDP2, where ranks would run unequal numbers of forwards."""
        sharded = getattr(self, "device_mesh", None) is not None
        if self.hparams.eval_generate and sharded and not getattr(self, "_warned_generation", False):
            log.warning("eval_generate is skipped under a sharded strategy: validation reports the loss only")
            self._warned_generation = True
        return self.hparams.eval_generate and not sharded

    def on_validation_epoch_end(self) -> None:
        if self._generates():
            self.scores.log_epoch(self, "val")

    def on_test_epoch_end(self) -> None:
        if self._generates():
            self.scores.log_epoch(self, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, Any]]:
        return self.answer(batch)

    def answer(self, batch: dict) -> list[dict[str, Any]]:
        """Generate an answer for each sample of a batch: prompt = the conversation up to its first reply."""
        return answer_samples(self.model, batch, self.hparams.max_new_tokens, self.hparams.num_beams)

    # -- optimisation --------------------------------------------------------------------------------------------
    def optimized(self) -> tuple[list[str], list[tuple[str, nn.Parameter]]]:
        """The parts the optimizer serves and its (name, parameter) pairs: every parameter of a trained part; with
        LoRA, a part holding adapters gives its adapters only (and is served even where the stage freezes it)."""
        scheduled = getattr(self, "scheduled_parts", ())  # frozen now, unfrozen later by StageFreeze
        parts = [p for p in PARTS if p in self.trainable_parts or p in scheduled]
        named = list(self.model.named_parameters())
        adapted = adapted_parts(self.model)
        if not adapted:
            return parts, named
        keep = set(trained_parameter_names(named, parts, adapted))
        return [p for p in PARTS if p in parts or p in adapted], [(n, p) for n, p in named if n in keep]

    def stored_parts(self, parts: Iterable[str]) -> tuple[str, ...]:
        """Non-LoRA parts a LoRA export stores whole: those that train, and re-initialised WTC gates."""
        adapted = adapted_parts(self.model)
        stored = {p for p in parts if p not in adapted} | ({"wtc"} if self.hparams.reinit_wtc_gate else set())
        return tuple(p for p in PARTS if p in stored)

    def configure_optimizers(self):
        parts, named = self.optimized()
        if self.model.lora is not None:
            self.model.lora.parts = self.stored_parts(parts)
        groups = part_param_groups(named, parts, self.lrs, self.hparams.weight_decay)
        if not groups:
            raise SettingsError("model.trainable: nothing to train")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            optimizer = torch.optim.AdamW(groups, betas=tuple(self.hparams.betas))
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = max(1, int(self.trainer.estimated_stepping_batches))
            scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(self.hparams.warmup_ratio * total)), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``, :func:`llava_uhd.build.fully_shard_model`): frozen parts are sharded
        too, without gradients or optimizer state. Training runs through ``LlavaUHD.forward`` so that the root
        unshards its own parameters; the piecewise distillation path does not, hence the error."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        if self.teacher is not None:
            raise SettingsError("model.distill_weight: feature distillation is not supported under FSDP2 "
                                "(ModelParallelStrategy); use DDP or FSDPStrategy for stage 1 with distillation")
        fully_shard_model(self.model, mesh)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a LoRA run's checkpoint holds: the optimizer's parameters and the persistent buffers."""
        _, named = self.optimized()
        buffers = {f"model.{n}" for n, _ in self.model.named_buffers()} & set(self.state_dict(keep_vars=True))
        return {f"model.{n}" for n, _ in named} | buffers

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.save(checkpoint)  # a resumed run keeps counting skipped batches
        sharded = getattr(self, "device_mesh", None) is not None  # a distributed checkpoint loads only whole states
        if self.model.lora is not None and not sharded:
            keep = self.checkpoint_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load(checkpoint)
        state = checkpoint.get("state_dict")
        if self.model.lora is None or not isinstance(state, dict):
            return
        keep, own = self.checkpoint_keys(), set(self.state_dict())
        missing = sorted(keep - set(state))
        unexpected = sorted(set(state) - own)
        if missing or unexpected:
            raise SettingsError(
                "ckpt_path: the checkpoint does not match this run's LoRA settings: "
                + (f"{len(missing)} trained tensor(s) missing ({', '.join(missing[:3])}) " if missing else "")
                + (f"{len(unexpected)} unknown tensor(s) ({', '.join(unexpected[:3])})" if unexpected else ""))


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
