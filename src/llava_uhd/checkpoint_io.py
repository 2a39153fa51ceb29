"""Crash-safe checkpoint files: a process killed while saving never leaves a truncated ``.ckpt`` behind.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction whose local temporary file is made by
``tempfile.mkstemp()`` in ``$TMPDIR``, not next to the checkpoint. Committing moves it with ``shutil.move``:
a rename when ``$TMPDIR`` and the run directory share a filesystem, but a copy (interruptible, so a truncated
``last.ckpt``) when they do not; nothing is fsynced, and a kill before the commit leaves a checkpoint-sized
orphan in ``$TMPDIR``. Here the file is written next to its target, fsynced, and renamed over it with
``os.replace`` (atomic on POSIX), so ``last.ckpt`` is always either the previous or the new checkpoint.
Remote paths (``s3://``, ...) keep Lightning's behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".partial-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-to-temp + fsync + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{target.name}{PARTIAL}*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        partial = target.with_name(f"{target.name}{PARTIAL}{os.getpid()}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
