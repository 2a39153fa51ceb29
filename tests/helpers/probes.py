"""Classes the training app loads by dotted path in the tests (``--model.class_path
tests.helpers.probes.ProbePretrain``, ``--trainer.callbacks+=tests.helpers.probes.KeyLog``): they write what a
run did to files the tests read back.

:class:`ProbePretrain` is stage 2 (``Pretrain``) on small images that can inject a NaN loss at chosen steps on
chosen ranks and writes, per rank, what happened: the steps it started and ended at, the skip counter, AdamW's
step count, whether the trained parameters changed in each step, a digest of every parameter,
and, under FSDP2, whether parameters are sharded and frozen ones got gradients.
:class:`KeyLog` logs the sample keys of every trained batch, and can hold a run at a chosen step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from llava_uhd.stages import Pretrain

KEYLOG_ENV = "LLAVA_UHD_TEST_KEYLOG"
HOLD_ENV = "LLAVA_UHD_TEST_HOLD_AT_STEP"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own values: the local shard of an FSDP2 DTensor, the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ProbePretrain(Pretrain):
    """Stage 2 with a small resolution policy (80^2-160^2 px instead of >= 512^2: tests stay fast) and probes."""

    def __init__(
        self,
        probe_dir: str | None = None,
        nan_steps: list[int] | None = None,
        nan_ranks: list[int] | None = None,
        ballast_mb: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            probe_dir: where ``rank<r>.json`` is written at train start and end.
            nan_steps: global steps whose loss is replaced by NaN.
            nan_ranks: ranks that see the NaN (default: all).
            ballast_mb: extra bytes in every checkpoint, so that saving takes long enough to be killed in.
        """
        super().__init__(**kwargs)
        self.model.config.min_pixels, self.model.config.max_pixels = 80 * 80, 160 * 160
        self.probe_dir = probe_dir
        self.nan_steps = set(nan_steps or [])
        self.nan_ranks = None if nan_ranks is None else set(nan_ranks)
        self.ballast_mb = ballast_mb
        self.record: dict[str, Any] = {"unchanged": {}, "frozen_grads": 0, "grads_seen": 0}
        self._before: list[torch.Tensor] = []
        self._step = -1

    def _trained(self) -> list[torch.Tensor]:
        return [p for p in self.parameters() if p.requires_grad]

    def _forward(self, batch: dict):
        loss, terms = super()._forward(batch)
        rank = self.trainer.global_rank
        if self.global_step in self.nan_steps and (self.nan_ranks is None or rank in self.nan_ranks):
            loss = loss * float("nan")
        return loss, terms

    def _write(self) -> None:
        if self.probe_dir:
            Path(self.probe_dir).mkdir(parents=True, exist_ok=True)
            path = Path(self.probe_dir) / f"rank{self.trainer.global_rank}.json"
            path.write_text(json.dumps(self.record, indent=1))

    def on_train_start(self) -> None:
        self.record["start_step"] = self.global_step
        self.record["nonfinite_at_start"] = self.nonfinite_steps
        self._write()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step = self.global_step  # every step, every rank: the ranks without the NaN must skip too
        self._before = [_local(p).detach().clone() for p in self._trained()]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        after = [_local(p).detach() for p in self._trained()]
        self.record["unchanged"][str(self._step)] = all(torch.equal(a, b) for a, b in zip(self._before, after))

    def on_before_optimizer_step(self, optimizer) -> None:
        self.record["grads_seen"] += any(p.grad is not None for p in self._trained())
        self.record["frozen_grads"] += sum(p.grad is not None for p in self.parameters() if not p.requires_grad)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ballast_mb:
            checkpoint["ballast"] = torch.ones(self.ballast_mb * 2**18)

    def on_train_end(self) -> None:
        optimizer = self.trainer.optimizers[0]
        first = self._trained()[0]
        state = optimizer.state.get(first, {})
        trained = {n for n, p in self.named_parameters() if p.requires_grad}
        self.record.update(
            end_step=self.global_step,
            nonfinite_steps=self.nonfinite_steps,
            adam_steps=int(_local(state["step"]).item()) if "step" in state else 0,
            digest={n: float(_local(p).detach().double().sum()) for n, p in self.named_parameters()},
            trained=sorted(trained),
            sharded={n: type(p).__name__ == "DTensor" for n, p in self.named_parameters()},
            world_size=self.trainer.world_size,
        )
        self._write()


class KeyLog(Callback):
    """Appends ``{"step", "keys"}`` of every trained batch to ``$LLAVA_UHD_TEST_KEYLOG/rank<r>.jsonl``; with
    ``$LLAVA_UHD_TEST_HOLD_AT_STEP`` set, every rank stops (sleeps) once it has logged that step, so the test's
    SIGKILL lands at a known step and no later checkpoint can be written first."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        folder = os.environ.get(KEYLOG_ENV)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with open(Path(folder) / f"rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "keys": list(batch["keys"])}) + "\n")
        hold = os.environ.get(HOLD_ENV)
        if hold and trainer.global_step >= int(hold):
            while True:  # wait here for the test's SIGKILL
                time.sleep(1)
