"""Checkpoints written beside their final path and renamed into place: a full disk keeps the old one.

Lightning's :class:`~lightning.pytorch.plugins.TorchCheckpointIO` saves a local file through an
fsspec transaction, which stages it in the system temporary folder and moves it over: across
filesystems that move copies into the target itself, so a disk that fills midway leaves a
truncated ``last.ckpt`` where the previous checkpoint was. :class:`AtomicCheckpointIO` writes
the temporary file in the checkpoint's own folder (:func:`matsciml.atomic.write_file`), so the
rename is atomic and a failed write leaves the previous checkpoint byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins import TorchCheckpointIO

from matsciml.atomic import write_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` with atomic local writes; remote paths are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol  # "file", or ("file", "local") in newer fsspec
        if storage_options is not None or "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(os.fspath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda handle: torch.save(checkpoint, handle))
