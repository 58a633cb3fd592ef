"""Where the shipped devsets live once installed (``matsciml.devsets`` package data)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEVSET_TASKS = ("s2ef", "is2re")
DEVSET_SPLITS = ("train", "val", "test")


def devset_root() -> Path:
    """The installed devsets folder (``devsets/`` of the repository)."""
    return Path(str(resources.files("matsciml.devsets")))


def devset_path(task: str, split: str = "train") -> Path:
    """Path of one split of a shipped devset, e.g. ``devset_path("s2ef", "val")``.

    Raises:
        ValueError: unknown task or split.
        FileNotFoundError: the devset was not built or not installed with the package.
    """
    if task not in DEVSET_TASKS:
        raise ValueError(f"unknown devset task {task!r}; choose one of {DEVSET_TASKS}")
    if split not in DEVSET_SPLITS:
        raise ValueError(f"unknown devset split {split!r}; choose one of {DEVSET_SPLITS}")
    path = devset_root() / task / split
    if not path.is_dir():
        raise FileNotFoundError(f"devset {task}/{split} not found at {path}; rebuild it with `matsciml devset build`")
    return path
