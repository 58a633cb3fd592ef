"""Where the shipped devsets live once installed (``matsciml.devsets`` package data)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEVSET_TASKS = ("s2ef", "is2re")
DEVSET_SPLITS = ("train", "val", "test")
#: Every shipped devset and the task whose record format it has: the slab devsets are named
#: after their task; ``md`` (liquid-alloy MD frames, ``matsciml devset md``) is an S2EF set.
DEVSETS = {"s2ef": "s2ef", "is2re": "is2re", "md": "s2ef"}


def devset_root() -> Path:
    """The installed devsets folder (``devsets/`` of the repository)."""
    return Path(str(resources.files("matsciml.devsets")))


def devset_path(name: str, split: str = "train") -> Path:
    """Path of one split of a shipped devset, e.g. ``devset_path("s2ef", "val")`` or ``devset_path("md")``.

    Args:
        name: a key of :data:`DEVSETS`.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        ValueError: unknown devset or split.
        FileNotFoundError: the devset was not built or not installed with the package.
    """
    if name not in DEVSETS:
        raise ValueError(f"unknown devset {name!r}; choose one of {tuple(DEVSETS)}")
    if split not in DEVSET_SPLITS:
        raise ValueError(f"unknown devset split {split!r}; choose one of {DEVSET_SPLITS}")
    path = devset_root() / name / split
    if not path.is_dir():
        command = "matsciml devset md" if name == "md" else "matsciml devset build"
        raise FileNotFoundError(f"devset {name}/{split} not found at {path}; rebuild it with `{command}`")
    return path
