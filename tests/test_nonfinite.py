"""A non-finite loss is skipped and counted and never reaches the weights (``UHDModule.training_step``).

:class:`ProbePretrain` is stage 2 (``Pretrain``) on small images that can inject a NaN loss at chosen steps on
chosen ranks and writes, per rank, what happened: the steps it started and ended at, the skip counter, AdamW's
step count, whether the trained parameters changed in each step, a digest of every parameter,
and, under FSDP2, whether parameters are sharded and frozen ones got gradients. The distributed and resume
tests run it too (``--model.class_path tests.test_nonfinite.ProbePretrain``). The one-rank-NaN case under
2-process DDP is in ``test_distributed.py`` (it shares that file's DDP launch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llava_uhd.stages import Pretrain

from .test_resume import ROOT, app_args, tiny_data


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


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_leave_weights_untouched(tmp_path_factory, tmp_path, monkeypatch):
    """Single process, in-process: NaN at steps 1 and 3 of 5 -> 2 skips, 3 AdamW steps, weights unchanged."""
    data = tiny_data(tmp_path_factory)
    monkeypatch.syspath_prepend(str(ROOT))  # `tests.test_nonfinite` importable for the CLI
    monkeypatch.syspath_prepend(str(ROOT / "src"))
    from main import main

    args = app_args(data, tmp_path, 5, 100, "--model.init_args.nan_steps", "[1, 3]")
    cli = main(args)
    module = cli.trainer.lightning_module
    record = module.record
    assert cli.trainer.global_step == 5
    assert module.nonfinite_steps == 2
    assert float(cli.trainer.callback_metrics["train/nonfinite_skipped"]) == 2.0
    # the weights do not move on the NaN steps, and do on every other one
    assert record["unchanged"] == {"0": False, "1": True, "2": False, "3": True, "4": False}
    assert record["adam_steps"] == 3  # the optimizer never stepped on the skipped batches
    assert record["grads_seen"] == 3  # ...and no gradient reached it
    assert record["frozen_grads"] == 0  # stage 2: the LLM is frozen and gets none
    assert all(torch.isfinite(p).all() for p in module.parameters())
