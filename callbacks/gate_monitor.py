"""Watching the content-adaptive WTC gates learn: are they still average pooling, and where do they look?

Every ``every_n_steps`` training steps, forward hooks on each content-adaptive WTC (registered for that one
batch only, so other steps cost nothing) recompute the gate weights ``w`` [windows, 4, C] of the batch's
input under ``no_grad`` and log, per layer ``<layer>`` (``block<k>``: the WTC after 1-based block k):

| scalar | meaning |
| --- | --- |
| ``wtc/<layer>/entropy`` | -sum_j w_j log w_j / log 4, mean over windows and channels: 1 = uniform (average pooling) |
| ``wtc/<layer>/max_weight`` | mean over windows and channels of max_j w_j: 0.25 = average pooling, 1 = one token |
| ``wtc/<layer>/weight_deviation`` | mean abs(w - 1/4): how far the weights are from average pooling |
| ``wtc/<layer>/output_rel_dist`` | L2(pooled - avg pooled) / L2(avg pooled) over the batch: how far the output is |

plus a TensorBoard histogram ``wtc/<layer>/max_weight_hist`` of the per-(window, channel) max weights. Every
``image_every_n_steps`` it adds the figure ``wtc/gates``: the batch's first image, then for each layer the
per-token gate weight averaged over channels laid over it (blue < 1/4 < red), drawn by
``llava_uhd.vision.gate_maps`` as the web demo draws it. Tokens are window-major inside
the encoder; the map is put back in row-major order with ``window_major_order`` (at WTC level k the token
grid is the patch grid / 2^k, and in a packed batch the first image's tokens come first).

Everything is computed and logged on global rank 0 only (no collectives). ``avg`` WTC has no gate and
``pixel_unshuffle`` no per-position weights: both are skipped with an info log.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llava_uhd.vision.gate_maps import draw_gate_maps, gate_weight_map
from llava_uhd.vision.pvc import WindowedTokenCompression, average_pool_windows

from .wtc_modules import find_wtc, layer_label

log = logging.getLogger(__name__)


def gate_statistics(wtc: WindowedTokenCompression, windows: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Scalars of the table above for ``windows`` [n, 4, C], and the max weight per (window, channel)."""
    weights = wtc.gate_weights(windows).float()
    x = windows.float()
    pooled = (weights * x).sum(dim=-2)
    avg = average_pool_windows(x.flatten(0, 1))
    max_weight = weights.amax(dim=-2)
    stats = {
        "entropy": (torch.special.entr(weights).sum(dim=-2) / math.log(4)).mean().item(),
        "max_weight": max_weight.mean().item(),
        "weight_deviation": (weights - 0.25).abs().mean().item(),
        "output_rel_dist": ((pooled - avg).norm() / avg.norm().clamp_min(1e-12)).item(),
    }
    return stats, max_weight.flatten()


class WTCGateMonitor(L.Callback):
    """Logs WTC gate statistics every ``every_n_steps`` and a gate-map figure every ``image_every_n_steps``."""

    def __init__(
        self,
        every_n_steps: int = 50,
        image_every_n_steps: int = 500,
        max_windows: int = 16384,
        histogram_values: int = 65536,
        figure_width: float = 3.5,
    ) -> None:
        """
        Args:
            every_n_steps: scalar and histogram period in optimizer steps (0 = off).
            image_every_n_steps: figure period in optimizer steps (0 = off).
            max_windows: windows per layer the statistics use (evenly strided subset of the batch's).
            histogram_values: cap on the values sent to each histogram.
            figure_width: width in inches of one panel of the figure.
        """
        super().__init__()
        self.every_n_steps = every_n_steps
        self.image_every_n_steps = image_every_n_steps
        self.max_windows = max_windows
        self.histogram_values = histogram_values
        self.figure_width = figure_width
        self._handles: list[Any] = []
        self._captured_step = -1
        self._stats: dict[str, dict[str, float]] = {}
        self._hists: dict[str, torch.Tensor] = {}
        self._maps: dict[str, torch.Tensor] = {}
        self._image: torch.Tensor | None = None
        self._announced = False

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _due(self, step: int, period: int) -> bool:
        return period > 0 and step % period == 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        step = trainer.global_step
        if trainer.global_rank != 0 or step == self._captured_step:  # one micro-batch per logged step
            return
        scalars, image = self._due(step, self.every_n_steps), self._due(step, self.image_every_n_steps)
        if not (scalars or image):
            return
        modules = self._monitored(pl_module)
        if not modules:
            return
        self._captured_step = step
        self._stats, self._hists, self._maps, self._image = {}, {}, {}, None
        geometry = self._first_image_geometry(pl_module, batch) if image else None
        for level, (name, wtc) in enumerate(modules):
            self._handles.append(wtc.register_forward_hook(self._make_hook(layer_label(name), level, geometry)))

    def _make_hook(self, label: str, level: int, geometry: dict | None):
        def hook(module: WindowedTokenCompression, args: tuple, output: torch.Tensor) -> None:
            if label in self._stats:  # a second forward in the same step (e.g. a teacher): keep the first
                return
            x = args[0].detach()
            with torch.no_grad():
                windows = module.windows(x.reshape(-1, x.shape[-1]))
                stride = max(1, math.ceil(windows.shape[0] / self.max_windows))
                self._stats[label], max_weight = gate_statistics(module, windows[::stride])
                self._hists[label] = max_weight[:: max(1, math.ceil(max_weight.numel() / self.histogram_values))]
                if geometry is not None:
                    self._maps[label] = self._weight_map(module, x, level, geometry)
        return hook

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        step = self._captured_step
        if self._due(step, self.every_n_steps):
            metrics = {f"wtc/{label}/{k}": v for label, stats in self._stats.items() for k, v in stats.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            for writer in self._tensorboards(trainer):
                for label, values in self._hists.items():
                    writer.add_histogram(f"wtc/{label}/max_weight_hist", values.cpu(), step)
        if self._maps and self._image is not None:
            figure = self._figure()
            for writer in self._tensorboards(trainer):
                writer.add_figure("wtc/gates", figure, step, close=False)
        self._maps, self._image = {}, None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- helpers -------------------------------------------------------------------------------------------------
    def _monitored(self, pl_module: L.LightningModule) -> list[tuple[str, WindowedTokenCompression]]:
        """Content-adaptive WTC of the trained model (not a teacher), in block order."""
        model = getattr(pl_module, "model", pl_module)
        modules = find_wtc(model)
        if not self._announced:
            self._announced = True
            skipped = [f"{n} ({m.pooling})" for n, m in modules if m.pooling != "content_adaptive"]
            if skipped:
                log.info("WTCGateMonitor: no content-adaptive gate to monitor in %s", ", ".join(skipped))
        return [(n, m) for n, m in modules if m.pooling == "content_adaptive"]

    def _first_image_geometry(self, pl_module: L.LightningModule, batch: dict) -> dict | None:
        encoder = getattr(getattr(pl_module, "model", None), "encoder", None)
        pixels = batch.get("pixel_values") if isinstance(batch, dict) else None
        if encoder is None or not hasattr(encoder, "stage_grids") or pixels is None or len(pixels) == 0:
            return None
        image = pixels[0]
        if image.numel() == 0:
            return None
        self._image = image.detach().cpu()
        return {"grids": encoder.stage_grids(image.shape[-2], image.shape[-1]), "levels": len(encoder.cfg.wtc_layers)}

    @staticmethod
    def _weight_map(module: WindowedTokenCompression, x: torch.Tensor, level: int, geometry: dict) -> torch.Tensor:
        """Gate weight per token of the first image, averaged over channels, on its row-major grid at ``level``."""
        tokens = x[0] if x.ndim == 3 else x  # dense [B, n, C], or packed [N, C] with image 0 first
        return gate_weight_map(module, tokens, geometry["grids"][level], geometry["levels"] - level)

    def _figure(self):
        """The same picture as the web demo's gate view (``llava_uhd.vision.gate_maps``)."""
        return draw_gate_maps(self._image, self._maps, self.figure_width)

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

