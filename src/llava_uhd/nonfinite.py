"""Skipping a training step whose loss is not finite, on every rank together.

One NaN batch (a degenerate image, an overflow under bf16) should cost one step, not the run. The loss is
checked on every rank and the ranks agree (``strategy.reduce_boolean_decision``, "any rank"), so either all
step or none does. On one rank the step returns ``None``: Lightning runs no backward and no optimizer step. On
several, Lightning refuses a ``None`` step, so every rank back-propagates a zero loss (DDP's all-reduce and
FSDP's reduce-scatter run as usual, nobody waits) and :meth:`NonFiniteSkip.drop_gradients` then removes the
gradients, so AdamW leaves every parameter and its state alone. Skips are counted (kept in checkpoints by the
module), logged as ``train/nonfinite_skipped`` and warned about on the console.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

METRIC = "train/nonfinite_skipped"
CHECKPOINT_KEY = "nonfinite_steps"


class NonFiniteSkip:
    """The skip decision, counter and gradient drop for one LightningModule's training steps."""

    def __init__(self) -> None:
        self.count = 0
        self.pending = False  # True from a skipped step on several ranks to the end of its backward

    def skip(self, module: L.LightningModule, loss: torch.Tensor, batch_size: int) -> bool:
        """Whether this step is skipped: the loss is not finite on this rank or on any other. A skip is counted,
        warned about and logged."""
        bad = not bool(torch.isfinite(loss.detach()))
        trainer = module.trainer
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.count += 1
            log.warning("step %d: non-finite loss, batch skipped (%d so far)", module.global_step, self.count)
            module.log(METRIC, float(self.count), batch_size=batch_size)
        return bool(bad)

    def skipped_loss(self, module: L.LightningModule, loss: torch.Tensor) -> torch.Tensor | None:
        """What ``training_step`` returns for a skipped step: ``None`` on one rank, else a zero loss whose
        gradients :meth:`drop_gradients` removes after the backward."""
        if module.trainer.world_size == 1:
            return None  # no backward, no optimizer step
        self.pending = True
        return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0

    def drop_gradients(self, module: torch.nn.Module) -> None:
        """From ``on_after_backward``: forget the gradients of a skipped step (others' are left alone)."""
        if self.pending:
            for param in module.parameters():
                param.grad = None
            self.pending = False

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Keep the counter in a checkpoint: a resumed run keeps counting skipped batches."""
        checkpoint[CHECKPOINT_KEY] = self.count

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.count = int(checkpoint.get(CHECKPOINT_KEY, 0))
