"""``llava_uhd.nonfinite.NonFiniteSkip`` on its own: a tiny Lightning run on one rank, and the several-rank
decision with a stand-in strategy (the real two-process runs are in ``test_distributed.py``)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from llava_uhd.nonfinite import CHECKPOINT_KEY, METRIC, NonFiniteSkip


class NaNAt(L.LightningModule):
    """A linear regression whose loss is NaN at the given steps; records whether the weights moved each step."""

    def __init__(self, nan_steps: set[int]) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_steps = nan_steps
        self.nonfinite = NonFiniteSkip()
        self.moved: dict[int, bool] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        if self.nonfinite.skip(self, loss, x.shape[0]):
            return self.nonfinite.skipped_loss(self, loss)
        return loss

    def on_after_backward(self) -> None:
        self.nonfinite.drop_gradients(self)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._before = self.layer.weight.detach().clone()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.moved[len(self.moved)] = not torch.equal(self._before, self.layer.weight)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = [(torch.randn(4, generator=gen), torch.randn(1, generator=gen)) for _ in range(10)]
        return torch.utils.data.DataLoader(data, batch_size=2)


def test_one_rank_skips_nan_steps_counts_and_logs_them(tmp_path, caplog):
    module = NaNAt({1, 3})
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="llava_uhd.nonfinite"):
        trainer.fit(module)
    assert trainer.global_step == 5  # a skipped batch still counts as a step of the loop
    assert module.moved == {0: True, 1: False, 2: True, 3: False, 4: True}
    assert module.nonfinite.count == 2 and not module.nonfinite.pending
    assert float(trainer.callback_metrics[METRIC]) == 2.0
    assert int(trainer.optimizers[0].state[module.layer.weight]["step"]) == 3  # AdamW never saw the NaN batches
    assert "step 3: non-finite loss, batch skipped (2 so far)" in caplog.text


class Ranks:
    """A stand-in for a several-rank strategy: ``reduce_boolean_decision`` answers what the other ranks saw."""

    def __init__(self, others_bad: bool) -> None:
        self.others_bad = others_bad
        self.calls: list[tuple[bool, bool]] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls.append((decision, all))
        return (decision or self.others_bad) if not all else (decision and not self.others_bad)


def fake_module(world_size: int, strategy: Ranks, layer: nn.Module):
    logged: dict[str, float] = {}
    module = SimpleNamespace(trainer=SimpleNamespace(world_size=world_size, strategy=strategy), global_step=7,
                             log=lambda name, value, **kw: logged.__setitem__(name, value),
                             parameters=layer.parameters)
    return module, logged


@pytest.mark.parametrize("local_nan", [False, True])
def test_several_ranks_skip_together_when_any_rank_is_not_finite(local_nan):
    layer = nn.Linear(3, 1)
    strategy = Ranks(others_bad=not local_nan)  # the NaN is here, or on another rank
    module, logged = fake_module(2, strategy, layer)
    skip = NonFiniteSkip()
    loss = layer(torch.ones(1, 3)).sum() * (float("nan") if local_nan else 1.0)
    assert skip.skip(module, loss, batch_size=1)
    assert strategy.calls == [(local_nan, False)]  # "any rank", not "all ranks"
    assert skip.count == 1 and logged == {METRIC: 1.0}
    out = skip.skipped_loss(module, loss)
    assert out is not None and float(out) == 0.0 and skip.pending  # every rank still runs its backward
    out.backward()
    assert all(p.grad is not None for p in layer.parameters())  # the backward (DDP's all-reduce) reached them all
    skip.drop_gradients(layer)
    assert all(p.grad is None for p in layer.parameters()) and not skip.pending


def test_several_ranks_all_finite_do_not_skip_and_keep_gradients():
    layer = nn.Linear(3, 1)
    strategy = Ranks(others_bad=False)
    module, logged = fake_module(2, strategy, layer)
    skip = NonFiniteSkip()
    loss = layer(torch.ones(1, 3)).sum()
    assert not skip.skip(module, loss, batch_size=1)
    assert skip.count == 0 and logged == {} and not skip.pending
    loss.backward()
    skip.drop_gradients(layer)  # nothing pending: a normal step's gradients stay
    assert all(p.grad is not None for p in layer.parameters())


def test_one_rank_does_not_ask_the_strategy_and_returns_no_loss():
    layer = nn.Linear(3, 1)
    strategy = Ranks(others_bad=True)  # would say "skip" if asked
    module, _ = fake_module(1, strategy, layer)
    skip = NonFiniteSkip()
    assert not skip.skip(module, layer(torch.ones(1, 3)).sum(), batch_size=1)
    assert skip.skip(module, torch.tensor(float("inf")), batch_size=1)
    assert strategy.calls == [] and skip.skipped_loss(module, torch.tensor(float("inf"))) is None
    assert not skip.pending


def test_the_counter_survives_a_checkpoint():
    skip = NonFiniteSkip()
    skip.count = 3
    checkpoint: dict = {}
    skip.save(checkpoint)
    assert checkpoint == {CHECKPOINT_KEY: 3}
    resumed = NonFiniteSkip()
    resumed.load(checkpoint)
    assert resumed.count == 3
    resumed.load({})  # a checkpoint from before the counter existed
    assert resumed.count == 0
