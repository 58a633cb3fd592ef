"""Which checkpoint of a run: a ``.ckpt`` file, or a run folder and ``"best"`` or ``"last"``.

``matsciml fit`` writes ``<run>/checkpoints/last.ckpt`` (the newest) and ``best.ckpt`` (the
validation with the lowest monitored metric, :class:`~matsciml.tasks.best_checkpoint.BestCheckpoint`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal

Which = Literal["best", "last"]
#: the files of an exported package (docs/export.md) that tell it from a checkpoint, and its card
MODEL_FILE, CARD_FILE = "model.json", "card.json"


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an exported package (a folder or zip holding ``model.json``); a Lightning
    checkpoint is a zip too, without one."""
    path = Path(path)
    if path.is_dir():
        return (path / MODEL_FILE).is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return MODEL_FILE in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def checkpoint_path(path: str | os.PathLike, which: Which | None = None) -> Path:
    """The checkpoint file ``path`` names.

    Args:
        path: a checkpoint file, or a run folder (holding ``checkpoints/``) or its ``checkpoints/`` folder.
        which: for a folder, ``"best"`` or ``"last"`` (default ``"last"``); must be unset for a file.
    """
    path = Path(path)
    if which not in (None, "best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        if which is not None:
            raise ValueError(f"{path} is not a run folder; which={which!r} picks a checkpoint of a run folder only")
        return path
    name = f"{which or 'last'}.ckpt"
    for candidate in (path / "checkpoints" / name, path / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no checkpoints/{name}"
        + (" (best.ckpt is written when a validation logs the task's monitor metric)" if which == "best" else "")
    )
