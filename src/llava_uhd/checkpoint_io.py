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
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llava_uhd.errors import SettingsError

PARTIAL = ".partial-"


UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def unreadable_checkpoint(setting: str, path: object, err: BaseException) -> SettingsError:
    """The user's error for a checkpoint file ``torch.load(weights_only=True)`` cannot read: corrupt, truncated,
    not a torch file, or holding pickled objects (which are never unpickled)."""
    if isinstance(err, pickle.UnpicklingError):
        why = "it is corrupt, or holds pickled objects other than tensors and plain values (never unpickled here)"
    else:
        lines = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {lines[0][:200] if lines else 'unreadable'}"
    return SettingsError(f"{setting}: {path} is not a readable checkpoint ({why})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are write-to-temp + fsync + ``os.replace``; loads never unpickle
    objects, and a file that cannot be read is the user's error naming ``ckpt_path``, not a traceback."""

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=True, **kwargs)
        except UNREADABLE as err:
            raise unreadable_checkpoint("ckpt_path", path, err) from err

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
