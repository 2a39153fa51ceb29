"""ZeroInitCheck: passes on the default init, stops the run on an all-zero gate or a gate not at average pooling."""

import pytest
import torch

from callbacks import StageFreeze, ZeroInitCheck, ZeroInitError
from llava_uhd.stages import SFT, PreAlignment


def test_default_init_passes_a_short_fit(make_module, fit):
    check = ZeroInitCheck()
    fit(make_module(PreAlignment), [StageFreeze(), check], max_steps=2)
    assert check._gradient_pending == []  # both gates were checked, with a non-zero gradient


def test_all_zero_gate_stops_the_run_naming_the_module(make_module, fit):
    module = make_module(PreAlignment)
    torch.nn.init.zeros_(module.model.encoder.wtc["4"].fc1.weight)  # the public code's init: W1 = 0 too
    with pytest.raises(ZeroInitError, match=r"model\.encoder\.wtc\.4: the gate gradient .* all zero"):
        fit(module, [StageFreeze(), ZeroInitCheck()], max_steps=2)


def test_gate_not_at_average_pooling_fails_at_fit_start(make_module, fit):
    module = make_module(PreAlignment)
    torch.nn.init.normal_(module.model.encoder.wtc["2"].fc2.weight)
    with pytest.raises(ZeroInitError, match=r"model\.encoder\.wtc\.2: .* exact average pooling"):
        fit(module, [ZeroInitCheck()], max_steps=1)


def test_frozen_gate_is_not_checked_for_a_gradient(make_module, fit):
    module = make_module(SFT, trainable=["projector"])
    torch.nn.init.zeros_(module.model.encoder.wtc["2"].fc1.weight)
    check = ZeroInitCheck()
    fit(module, [StageFreeze(), check], max_steps=1)
    assert check._gradient_pending == []
