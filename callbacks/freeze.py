"""Freezing the parts a stage does not train, before any strategy wraps the model (docs/design.md,
"Stages, parts and freezing").

Lightning calls a callback's ``setup`` before ``configure_model`` and before DDP / FSDP2 wrap the module, so
freezing here is seen by every strategy: DDP builds its gradient reducer only for parameters that require
grad, and FSDP2 shards frozen and trained parameters alike but reduces gradients only for trained ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import lightning as L
import torch
from torch import nn

from llava_uhd.hook_warnings import IgnoreBetweenHooks
from llava_uhd.lora import adapted_parts, is_adapter, trains
from llava_uhd.parts import PARTS, part_of

log = logging.getLogger(__name__)


def module_parts(model: nn.Module) -> dict[nn.Module, set[str]]:
    """The parts each submodule of a ``LlavaUHD`` touches: its parameters' parts, or, for a parameter-free
    module (dropout, identity), the part its name falls in."""
    parts: dict[nn.Module, set[str]] = {}

    def visit(module: nn.Module, prefix: str) -> set[str]:
        own = {part_of(f"{prefix}{name}") for name, _ in module.named_parameters(recurse=False)}
        for name, child in module.named_children():
            own |= visit(child, f"{prefix}{name}.")
        if not own and prefix:
            own = {part_of(f"{prefix}_")}
        parts[module] = own
        return own

    visit(model, "")
    return parts


class StageFreeze(L.Callback):
    """Freeze ``pl_module.frozen_parts`` (and the distillation teacher) in ``setup``, optionally unfreezing
    parts later on a step schedule.

    Frozen parts get ``requires_grad=False`` and every module lying wholly inside them is kept in eval mode
    (dropout off, norms in inference behaviour) across Lightning's ``model.train()`` calls. Parts named in
    ``unfreeze_at`` are published as ``pl_module.scheduled_parts`` so that ``configure_optimizers`` puts their
    parameters into the optimizer from the start (AdamW skips parameters without a gradient); at step
    ``unfreeze_at[part]`` they get ``requires_grad=True`` and train mode. Under DDP, whose reducer only knows
    the parameters that required grad when it was built, the gradients of unfrozen parts are averaged across
    ranks here before each optimizer step. Trainable and frozen parameter counts (per part, total) go to the
    log and to the logger as ``params/...`` at fit start. Lightning's warning at train start about modules in
    eval mode is silenced from fit start until train start when its count is exactly the modules frozen here.
    """

    def __init__(self, unfreeze_at: dict[str, int] | None = None) -> None:
        """
        Args:
            unfreeze_at: ``{part: global_step}``: start training a frozen part at that step, e.g. ``{"vit": 100}``.
        """
        super().__init__()
        self.unfreeze_at = dict(unfreeze_at or {})
        unknown = set(self.unfreeze_at) - set(PARTS)
        if unknown:
            raise ValueError(f"unfreeze_at: unknown parts {sorted(unknown)}; parts are {PARTS}")
        self.frozen: set[str] = set()
        self.unfrozen: set[str] = set()
        self._unfrozen_after_setup: set[str] = set()
        self.counts: dict[str, dict[str, int]] = {}
        self._eval_modules: list[nn.Module] = []
        self._parts: dict[nn.Module, set[str]] = {}
        self._quiet = IgnoreBetweenHooks()

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        frozen = set(pl_module.frozen_parts)
        trained_but_scheduled = set(self.unfreeze_at) - frozen
        if trained_but_scheduled:
            log.warning("unfreeze_at: %s already trained in stage %s; ignored", sorted(trained_but_scheduled),
                        getattr(pl_module, "stage", "?"))
        self.unfreeze_at = {p: s for p, s in self.unfreeze_at.items() if p in frozen}
        pl_module.scheduled_parts = tuple(self.unfreeze_at)
        self.unfrozen = {p for p, s in self.unfreeze_at.items() if s <= 0}
        self._unfrozen_after_setup = set()
        self._parts = module_parts(pl_module.model)
        self._set_frozen(pl_module, frozen - self.unfrozen)
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            teacher.requires_grad_(False)
        self.counts = self._count(pl_module)
        total = self.counts["total"]
        log.info("%s: trainable %s, frozen %s parameters (frozen parts: %s%s)", type(pl_module).__name__,
                 f"{total['trainable']:,}", f"{total['frozen']:,}", ", ".join(sorted(self.frozen)) or "none",
                 f"; unfreeze at {self.unfreeze_at}" if self.unfreeze_at else "")
        for part in PARTS:
            c = self.counts.get(part)
            if c:
                log.info("  %-11s trainable %12s  frozen %12s", part, f"{c['trainable']:,}", f"{c['frozen']:,}")

    def _set_frozen(self, pl_module: L.LightningModule, frozen: set[str]) -> None:
        self.frozen = frozen
        adapted = adapted_parts(pl_module.model)  # LoRA: adapters train even in a frozen part, their base never
        for part in PARTS:
            for name, param in pl_module.part_parameters(part):
                param.requires_grad_(trains(name, part, part not in frozen, adapted))
        holding_adapters = {m for n, m in pl_module.model.named_modules()  # a LoRA layer, its adapters, their dropout
                            if is_adapter(n) or any(is_adapter(p) for p, _ in m.named_parameters())}
        self._eval_modules = [m for m, parts in self._parts.items()
                              if parts and parts <= frozen and m not in holding_adapters]
        if pl_module.training:
            for module, parts in self._parts.items():
                if parts and not parts <= frozen:
                    module.training = True  # a module leaving the frozen set (unfreeze) trains again
        self._apply_eval(pl_module)

    def _apply_eval(self, pl_module: L.LightningModule) -> None:
        for module in self._eval_modules:
            module.training = False  # per module, not .eval(): the list already holds every descendant
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            teacher.eval()

    def _eval_module_count(self, pl_module: L.LightningModule) -> int:
        """How many modules this callback keeps in eval mode (frozen parts and the teacher)."""
        teacher = getattr(pl_module, "teacher", None)
        ours = {id(m) for m in self._eval_modules} | ({id(m) for m in teacher.modules()} if teacher else set())
        return len(ours)

    def _count(self, pl_module: L.LightningModule) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for part in PARTS:
            params = [p for _, p in pl_module.part_parameters(part)]
            if params:
                trainable = sum(p.numel() for p in params if p.requires_grad)
                counts[part] = {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            counts["teacher"] = {"trainable": 0, "frozen": sum(p.numel() for p in teacher.parameters())}
        counts["total"] = {k: sum(c[k] for c in counts.values()) for k in ("trainable", "frozen")}
        return counts

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {f"params/{kind}/{part}": float(n) for part, c in self.counts.items() for kind, n in c.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        count = self._eval_module_count(pl_module)
        if count:  # frozen on purpose: Lightning's check at train start would call them a mistake
            self._quiet.ignore(rf"Found {count} module\(s\) in eval mode at the start of training")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._quiet.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._quiet.restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._quiet.restore()

    # -- training ------------------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_eval(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        due = {p for p, s in self.unfreeze_at.items() if trainer.global_step >= s} - self.unfrozen
        if due:
            self.unfrozen |= due
            self._unfrozen_after_setup |= due
            self._set_frozen(pl_module, self.frozen - due)
            log.info("step %d: unfroze %s", trainer.global_step, ", ".join(sorted(due)))
            for logger in trainer.loggers:
                logger.log_metrics({f"params/unfrozen/{p}": 1.0 for p in due}, step=trainer.global_step)
        self._apply_eval(pl_module)  # Lightning's model.train() (after validation, at epoch start) undoes it

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self._unfrozen_after_setup or trainer.world_size <= 1 or not _is_ddp(trainer):
            return
        grads = [p.grad for part in sorted(self._unfrozen_after_setup) for _, p in pl_module.part_parameters(part)
                 if p.grad is not None]
        _all_reduce_mean(grads, trainer.world_size)


def _is_ddp(trainer: L.Trainer) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(trainer.strategy.model, DistributedDataParallel)


def _all_reduce_mean(grads: Iterable[torch.Tensor], world_size: int) -> None:
    """Average gradients DDP does not manage, in one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= world_size
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(chunk.view_as(t))
