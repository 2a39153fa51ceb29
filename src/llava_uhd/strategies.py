"""FSDP2 checkpoints that a kill cannot corrupt.

Lightning's ``ModelParallelStrategy`` saves a distributed checkpoint (a directory: one ``*.distcp`` shard per
rank, ``.metadata``, ``meta.pt``) by writing into the target directory in place. Re-saving ``last.ckpt``
overwrites its shards one by one, so a process killed mid-save leaves shards of two different steps under the
old ``.metadata``: a ``last.ckpt`` that no longer loads. :class:`AtomicModelParallelStrategy` writes each
checkpoint into a fresh sibling directory and, once every rank has finished, swaps it in with one rename
(Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames). Everything else is Lightning's strategy; it
runs on CPU (gloo) and CUDA (nccl) alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy

from .atomic import exchange_paths
from .checkpoint_io import PARTIAL


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose distributed checkpoints appear whole or not at all."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:  # one file through CheckpointIO (see checkpoint_io.py)
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        partial = target.with_name(f"{target.name}{PARTIAL}dcp")
        if self.global_rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
        self.barrier("checkpoint_partial_ready")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint_written")  # every rank's shard is complete
        if self.global_rank == 0:
            publish(partial, target)
        self.barrier("checkpoint_published")


def publish(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``: atomically when ``target`` is new or the OS can exchange two paths."""
    if not target.exists():
        os.replace(new, target)
        return
    if not exchange_paths(new, target):  # no atomic exchange here: a short window without ``target``
        old = new.with_name(f"{new.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        new = old
    if new.is_dir():  # now the previous checkpoint
        shutil.rmtree(new, ignore_errors=True)
    else:
        new.unlink(missing_ok=True)
