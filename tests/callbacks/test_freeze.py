"""StageFreeze: frozen parts stay bit-identical and in eval mode, trained parts all move, unfreezing works."""

import re
import warnings

import lightning as L
import pytest
import torch

from callbacks import StageFreeze
from callbacks.freeze import module_parts
from llava_uhd.parts import part_of
from llava_uhd.stages import SFT, PreAlignment, Pretrain

from .conftest import HIGH_LR


class ModeProbe(L.Callback):
    """Records, after each forward, whether modules wholly inside frozen / trained parts are in train mode."""

    def __init__(self) -> None:
        self.frozen_training: list[bool] = []
        self.trained_training: list[bool] = []
        self.teacher_training: list[bool] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.parts = module_parts(pl_module.model)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        frozen = set(pl_module.frozen_parts)
        for module, parts in self.parts.items():
            if parts and parts <= frozen:
                self.frozen_training.append(module.training)
            elif parts and not parts & frozen:
                self.trained_training.append(module.training)
        if pl_module.teacher is not None:
            self.teacher_training += [m.training for m in pl_module.teacher.modules()]


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


@pytest.mark.parametrize("cls", [PreAlignment, Pretrain, SFT])
def test_frozen_parts_unchanged_trained_parts_all_move(cls, make_module, fit, recwarn):
    extra = {"distill_weight": 0.5} if cls is PreAlignment else {}
    module = make_module(cls, lr=HIGH_LR, **extra)
    before = snapshot(module)
    teacher_before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()} if module.teacher else {}
    probe = ModeProbe()
    # dropout > 0 makes the eval-mode claim observable: frozen dropout layers must not drop.
    module.model.llm.config.attention_dropout = 0.1
    fit(module, [StageFreeze(), probe], max_steps=3)
    frozen = set(module.frozen_parts)
    assert frozen == {"PreAlignment": {"vit", "llm"}, "Pretrain": {"llm"}, "SFT": set()}[cls.__name__]
    unchanged, unmoved = [], []
    for name, param in module.model.named_parameters():
        part_frozen = part_of(name) in frozen
        same = torch.equal(param.detach(), before[name])
        if part_frozen:
            assert not param.requires_grad
            if not same:
                unchanged.append(name)
        elif same:
            unmoved.append(name)
    assert not unchanged, f"frozen parameters changed: {unchanged}"
    assert not unmoved, f"trained parameters that did not move: {unmoved}"
    for name, param in (module.teacher.named_parameters() if module.teacher else []):
        assert not param.requires_grad and torch.equal(param, teacher_before[name])
    assert probe.trained_training and all(probe.trained_training)
    if frozen:
        assert probe.frozen_training and not any(probe.frozen_training)
    if module.teacher is not None:
        assert probe.teacher_training and not any(probe.teacher_training)
    # parts frozen on purpose are not reported by Lightning as "modules in eval mode" (a false alarm)
    assert not [w for w in recwarn if "in eval mode at the start of training" in str(w.message)]
    # and the silencing (this callback's, the data module's) ends with the run: no filter is left behind
    left = [f[1].pattern for f in warnings.filters if f[1] is not None]
    assert not [p for p in left if re.search("eval mode|IterableDataset", p)]


def test_unfreeze_schedule_trains_a_part_from_its_step(make_module, fit):
    module = make_module(PreAlignment, lr={**HIGH_LR})
    before = snapshot(module)
    seen = {}

    class AtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = (snapshot(pl_module), pl_module.model.encoder.blocks[0].training,
                                         pl_module.model.encoder.blocks[0].attn.qkv.weight.requires_grad)

    freeze = StageFreeze(unfreeze_at={"vit": 2})
    trainer = fit(module, [freeze, AtStep()], max_steps=4)
    assert module.scheduled_parts == ("vit",)
    groups = {g["name"] for g in trainer.optimizers[0].param_groups}
    assert {"vit", "patch_embed", "wtc", "projector"} <= groups and "llm" not in groups
    vit = [n for n, _ in module.part_parameters("vit")]
    llm = [n for n, _ in module.part_parameters("llm")]
    snap2, training2, grad2 = seen[2]
    assert all(torch.equal(snap2[n], before[n]) for n in vit), "vit moved while frozen"
    assert not seen[1][1] and not seen[1][2] and training2 and grad2
    final = snapshot(module)
    assert all(not torch.equal(final[n], snap2[n]) for n in vit), "vit did not train after unfreezing"
    assert all(torch.equal(final[n], before[n]) for n in llm)
    assert freeze.unfrozen == {"vit"}


def test_unknown_part_is_rejected():
    with pytest.raises(ValueError, match="unknown parts"):
        StageFreeze(unfreeze_at={"decoder": 3})
