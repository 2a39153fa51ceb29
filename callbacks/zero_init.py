"""Zero-init check for content-adaptive WTC (docs/design.md, "Windowed token compression (WTC)").

The content-adaptive gate must start as exact average pooling (W2 = 0, b2 = 0) *and* still learn: W1
keeps its random init, so the gate's gradient is non-zero from the first backward. Zeroing W1 too (as the
public code does) also gives exact average pooling at step 0, but then the hidden layer is GELU(0) = 0 and
every gate gradient is identically zero: the gate never leaves average pooling, silently. This callback
fails the run at the first step in either case, naming the module.

The released LLaVA-UHD v3's loader zeroes every WTC parameter, so a loaded release holds such dead gates. When
its gates are to train (a fine-tune of the release), the check names that case at fit start and points to
``--model.reinit_wtc_gate true``, which re-initialises them the product's way.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from llava_uhd.errors import SettingsError
from llava_uhd.vision.pvc import average_pool_windows

from .wtc_modules import find_wtc, full_tensor, local_copy

log = logging.getLogger(__name__)


class ZeroInitError(RuntimeError):
    """A content-adaptive WTC does not start as average pooling, or its gate gets no gradient."""


DEAD_GATE_HINT = (
    "the gate is fully zeroed (W1 and W2 all zero), as the released LLaVA-UHD v3 ships it: its hidden layer is "
    "GELU(0) = 0 for every token, so it gets exactly zero gradient and stays average pooling for the whole run. "
    "Pass --model.reinit_wtc_gate true to re-initialise the gates (W1 random, W2 and b2 zero: exact average "
    "pooling at step 0 with a live gradient), or freeze the wtc part."
)


def is_dead_gate(wtc) -> bool:
    """W1 = 0 and W2 = 0: the gate's logits are the same for the 4 positions, its softmax is flat and every gate
    gradient is exactly zero (whatever the biases)."""
    copy = local_copy(wtc)
    return not bool(copy.fc1.weight.abs().sum() > 0) and not bool(copy.fc2.weight.abs().sum() > 0)


class ZeroInitCheck(L.Callback):
    """At fit start: every content-adaptive WTC outputs exactly average pooling. After the first backward:
    every trainable one has a non-zero gate (``fc2.weight``) gradient. Raises :class:`ZeroInitError` otherwise.

    The start check only makes sense on freshly initialised gates: it is skipped when resuming a run
    (``ckpt_path``), and ``check_start=False`` skips it for runs that start from trained WTC weights.
    """

    def __init__(self, check_start: bool = True, check_gradient: bool = True, num_windows: int = 64) -> None:
        """
        Args:
            check_start: check that each gate's output equals average pooling at fit start.
            check_gradient: check that each trainable gate gets a non-zero gradient at the first backward.
            num_windows: random 2x2 windows fed to each gate in the start check.
        """
        super().__init__()
        self.check_start = check_start
        self.check_gradient = check_gradient
        self.num_windows = num_windows
        self._gradient_pending: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = [(n, m) for n, m in find_wtc(pl_module) if m.pooling == "content_adaptive"]
        if not modules:
            log.info("ZeroInitCheck: no content-adaptive WTC in the model, nothing to check")
            return
        resuming = trainer.ckpt_path is not None
        if self.check_start and not resuming:
            generator = torch.Generator().manual_seed(0)
            for name, wtc in modules:
                copy = local_copy(wtc)  # plain fp32 CPU copy: gathers FSDP2 shards, every rank alike
                x = torch.randn(2, 4 * self.num_windows, copy.dim, generator=generator)
                with torch.no_grad():
                    if not torch.equal(copy(x), average_pool_windows(x)):
                        raise ZeroInitError(
                            f"{name}: content-adaptive WTC does not start as exact average pooling; its gate "
                            "output layer (fc2 weight and bias) must be zero-initialised"
                        )
            log.info("ZeroInitCheck: %d content-adaptive WTC start as exact average pooling", len(modules))
        self._gradient_pending = []
        if self.check_gradient and "wtc" in getattr(pl_module, "trainable_parts", ("wtc",)):
            self._gradient_pending = [n for n, m in modules if m.fc2.weight.requires_grad]
            dead = [n for n, m in modules if n in self._gradient_pending and is_dead_gate(m)]
            if dead:
                message = f"{', '.join(dead)}: the gate gradient is all zero from the first step: {DEAD_GATE_HINT}"
                # chained to a settings error, so the training app prints it as one line naming the setting
                raise ZeroInitError(message) from SettingsError(f"model.reinit_wtc_gate: {message}")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._gradient_pending or getattr(pl_module, "skipping_step", False):
            return  # nothing to check, or a skipped non-finite step whose gradients are about to be dropped
        modules = dict(find_wtc(pl_module))
        pending = []
        for name in self._gradient_pending:
            grad = modules[name].fc2.weight.grad
            if grad is None:  # not used by this batch (e.g. text only): check at the next backward
                pending.append(name)
                continue
            if not bool(full_tensor(grad).detach().abs().sum() > 0):
                if is_dead_gate(modules[name]):
                    message = f"{name}: the gate gradient is all zero after the first backward: {DEAD_GATE_HINT}"
                    raise ZeroInitError(message) from SettingsError(f"model.reinit_wtc_gate: {message}")
                raise ZeroInitError(
                    f"{name}: the gate gradient (fc2.weight.grad) is all zero after the first backward, so the gate "
                    "can never leave average pooling. Zero only fc2 (W2, b2) at init and keep fc1 (W1) random."
                )
            log.info("ZeroInitCheck: %s gate gradient is non-zero at step %d", name, trainer.global_step)
        self._gradient_pending = pending
