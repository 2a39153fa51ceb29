"""Training throughput in the units that matter for a native-resolution MLLM: images, visual tokens, LLM tokens.

Lightning's ``ThroughputMonitor`` (with fabric's ``Throughput``) does not fit: it counts one "samples" and one
"lengths" quantity (we need three), requires ``samples >= batches`` (a text-only batch has zero images) and
measures on rank 0 only, scaling by the world size, which assumes equal per-rank batches; token-budget buckets
give every rank different image and token counts. So this callback sums the counts over ranks and divides by
the wall time of a window of training steps.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def batch_counts(batch: dict, image_token_id: int | None) -> tuple[float, float, float, float]:
    """(images, visual tokens, LLM tokens, samples) of one collated batch."""
    pixels = batch.get("pixel_values")
    images = 0 if pixels is None or len(pixels) == 0 or pixels[0].numel() == 0 else len(pixels)
    input_ids = batch["input_ids"]
    visual = int((input_ids == image_token_id).sum()) if image_token_id is not None else 0
    mask = batch.get("attention_mask")
    llm = int(mask.sum()) if mask is not None else input_ids.numel()
    return float(images), float(visual), float(llm), float(input_ids.shape[0])


class ThroughputLogger(L.Callback):
    """Logs ``throughput/{images,visual_tokens,llm_tokens,samples}_per_s`` (all ranks together) and
    ``throughput/step_s`` every ``window`` optimizer steps (default: the trainer's ``log_every_n_steps``).

    Visual tokens are the ``<|image_pad|>`` positions of ``input_ids`` (``pl_module.model.image_token_id``),
    LLM tokens the attention mask's sum (padding excluded). Time spent in validation is not counted.
    The last values are kept on ``self.metrics``.
    """

    NAMES = ("images", "visual_tokens", "llm_tokens", "samples")

    def __init__(self, window: int | None = None) -> None:
        """
        Args:
            window: optimizer steps per measurement (None: the trainer's ``log_every_n_steps``).
        """
        super().__init__()
        self.window = window
        self.metrics: dict[str, float] = {}
        self._counts = [0.0] * len(self.NAMES)
        self._batches = 0
        self._t0 = self._validation_t0 = 0.0
        self._paused = 0.0

    def _window_batches(self, trainer: L.Trainer) -> int:
        return max(1, self.window or trainer.log_every_n_steps) * trainer.accumulate_grad_batches

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def _reset(self) -> None:
        self._counts = [0.0] * len(self.NAMES)
        self._batches = 0
        self._t0 = time.perf_counter()
        self._paused = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any, batch_idx):
        token_id = getattr(getattr(pl_module, "model", None), "image_token_id", None)
        for i, n in enumerate(batch_counts(batch, token_id)):
            self._counts[i] += n
        self._batches += 1
        if self._batches < self._window_batches(trainer):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        elapsed = time.perf_counter() - self._t0 - self._paused
        totals = torch.tensor(self._counts, dtype=torch.float64, device=trainer.strategy.root_device)
        if trainer.world_size > 1:  # every rank reaches this step together: equal batches per rank
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
            elapsed = float(trainer.strategy.reduce(torch.tensor(elapsed, device=totals.device), reduce_op="max"))
        steps = self._batches / trainer.accumulate_grad_batches
        self.metrics = {f"throughput/{name}_per_s": float(v) / elapsed for name, v in zip(self.NAMES, totals)}
        self.metrics["throughput/step_s"] = elapsed / steps
        for logger in trainer.loggers:
            logger.log_metrics(self.metrics, step=trainer.global_step)
        self._reset()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused += time.perf_counter() - self._validation_t0
