"""Several datasets read as one split, and the weighted draw of each training epoch.

A training split given as a list (``train_path: [a, b]``) is a :class:`MixtureDataset`: the
concatenation of its datasets, indexed ``0 .. N - 1`` with ``N`` the records of all of them together.
``weights`` say which fraction of each epoch comes from each dataset. **An epoch has ``N``
structures**, as many as all training sets together; dataset ``i`` contributes ``n_i`` of them,
``w_i / sum(w) * N`` rounded by largest remainder (so the ``n_i`` sum to ``N``). Its records are
taken from an endless stream of passes over it, each pass a permutation seeded by
``(seed, i, pass)``; epoch ``e`` takes stream positions ``e * n_i .. (e + 1) * n_i - 1``. So a
dataset drawn less than its size is read without replacement across epochs (every record once
before any repeats), and one drawn more than its size is read in whole passes plus part of the next
(a record at most once more than any other). The union of the draws is then shuffled by a
permutation seeded by ``(seed, e)``. Everything is a function of ``(seed, e)``: every DDP rank
computes the same epoch, and a resumed run the same batches. Without ``weights``, ``n_i`` is the
size of dataset ``i``: every record once per epoch, as one dataset would be.

:class:`~matsciml.data.samplers.AtomBalancedBatchSampler` takes this draw in place of its
permutation (its ``draw`` argument), and cuts and balances it as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch.utils.data

from matsciml.data.datasets import LMDBDataset
from matsciml.data.records import Record

__all__ = ["MixtureDataset", "dataset_names", "epoch_counts", "open_datasets", "split_paths"]

#: entropy tag of the per-dataset stream seeds, so they never coincide with the epoch shuffle's
_STREAM = 0x6D6978
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def split_paths(key: str, value: str | os.PathLike | Sequence | None) -> str | list[str] | None:
    """A ``*_path`` setting as a string, or a list of two or more strings (a one-item list is the path).

    Raises:
        TypeError: not a path or a list of paths.
        ValueError: an empty list.
    """
    if value is None or isinstance(value, str | os.PathLike):
        return None if value is None else os.fspath(value)
    if not isinstance(value, Sequence) or not all(isinstance(p, str | os.PathLike) for p in value):
        raise TypeError(f"{key} must be a path or a list of paths, got {value!r}")
    if not value:
        raise ValueError(f"{key} is an empty list; give one path or several")
    paths = [os.fspath(p) for p in value]
    return paths[0] if len(paths) == 1 else paths


def check_weights(weights: Sequence[float] | None, train_paths: str | list[str] | None) -> list[float] | None:
    """``weights`` checked against ``train_path``: one non-negative number per dataset, not all zero."""
    if weights is None:
        return None
    count = len(train_paths) if isinstance(train_paths, list) else 1
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a list of numbers, one per train_path entry, got {weights!r}")
    if len(weights) != count:
        raise ValueError(
            f"weights has {len(weights)} entries but train_path has {count} dataset(s); give one weight per dataset"
        )
    values = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite numbers >= 0, got {list(weights)}")
        values.append(float(w))
    if sum(values) == 0:
        raise ValueError(f"weights are all zero ({values}); at least one dataset must be drawn from")
    return values


def dataset_names(paths: Sequence[str], names: Sequence[str] | None = None, key: str = "val_path") -> list[str]:
    """Metric names of the datasets: ``names`` if given, else the folder (or file stem) names.

    Folders of the same name (``oc20/val``, ``mine/val``) get their parents' names too
    (``oc20_val``, ``mine_val``), as many as make them distinct.

    Raises:
        ValueError: ``names`` of another length, repeated, or not made of letters, digits, ``_.-``.
    """
    if names is not None:
        if isinstance(names, str) or len(names) != len(paths):
            raise ValueError(f"names must list one name per {key} entry ({len(paths)}), got {names!r}")
        names = [str(n) for n in names]
        bad = [n for n in names if not _NAME.fullmatch(n)]
        if bad or len(set(names)) != len(names):
            raise ValueError(
                f"names must be distinct and made of letters, digits, '_', '.', '-' (they become metric "
                f"names val/<name>/...), got {names}"
            )
        return names
    resolved = [Path(p).resolve() for p in paths]
    parts = [(p.with_suffix("") if p.suffix == ".lmdb" else p).parts[1:] for p in resolved]  # no root
    for depth in range(1, max(map(len, parts)) + 1):
        found = [re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(p[-depth:])) for p in parts]
        if len(set(found)) == len(found):
            return found
    raise ValueError(f"{key} lists the same dataset twice: {list(paths)}")


def epoch_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> np.ndarray:
    """Structures drawn from each dataset per epoch: ``w_i / sum(w) * N`` by largest remainder, summing to ``N``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if weights is None:
        return sizes.copy()
    total = int(sizes.sum())
    quotas = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(quotas).astype(np.int64)
    # the largest fractional parts get the structures rounding left over (ties: the earlier dataset)
    for i in np.argsort(-(quotas - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return counts


class MixtureDataset(torch.utils.data.Dataset):
    """The concatenation of several datasets of one task, with each epoch's weighted draw.

    Args:
        datasets: the datasets, in the order of ``train_path`` / ``val_path``.
        names: their names (for metrics and messages), see :func:`dataset_names`.
        weights: fraction of each epoch drawn from each dataset (normalised to sum to one);
            ``None``: each dataset's share of all records (every record once per epoch).
    """

    def __init__(self, datasets: Sequence[LMDBDataset], names: Sequence[str], weights: Sequence[float] | None = None):
        if len(datasets) != len(names):
            raise ValueError(f"{len(datasets)} datasets but {len(names)} names")
        self.datasets, self.names = list(datasets), list(names)
        self.task = self.datasets[0].task
        self.sizes = np.asarray([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.counts = epoch_counts(self.sizes, self.weights)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset number, index inside it)`` of mixture item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} records")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return part, index - int(self.offsets[part])

    def read(self, index: int) -> Record:
        part, inner = self.locate(index)
        return self.datasets[part].read(inner)

    def __getitem__(self, index: int) -> Record:
        part, inner = self.locate(index)
        return self.datasets[part][inner]

    def natoms(self) -> np.ndarray | None:
        """Atom count of every record (from the metadata), or ``None`` if a dataset lacks them."""
        counts = [d.natoms() for d in self.datasets]
        return None if any(c is None for c in counts) else np.concatenate(counts).astype(np.int64)

    def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """The ``len(self)`` mixture indices of epoch ``epoch`` (see the module docstring).

        ``shuffle=False``: passes in record order and the draws of each dataset one after another.
        """
        picks = [
            self.offsets[i] + _stream(int(size), int(count), epoch, [seed, _STREAM, i], shuffle)
            for i, (size, count) in enumerate(zip(self.sizes, self.counts, strict=True))
        ]
        order = np.concatenate(picks).astype(np.int64)
        if shuffle:
            order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
        return order

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {s} records, {c} per epoch" for n, s, c in zip(self.names, self.sizes, self.counts, strict=True)
        )
        return f"{type(self).__name__}({parts})"


def _stream(size: int, count: int, epoch: int, entropy: list[int], shuffle: bool) -> np.ndarray:
    """Positions ``epoch * count ..`` of the endless stream of passes over ``range(size)``."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    start, stop = epoch * count, (epoch + 1) * count
    passes = range(start // size, (stop - 1) // size + 1)
    stream = np.concatenate(
        [np.random.default_rng([*entropy, p]).permutation(size) if shuffle else np.arange(size) for p in passes]
    )
    first = passes[0] * size
    return stream[start - first : stop - first]


def open_datasets(key: str, paths: list[str], task: str, open_one: Callable[[str], LMDBDataset]) -> list[LMDBDataset]:
    """The datasets of a list-valued ``key``, each checked to hold ``task`` records.

    Raises:
        ValueError: a path that does not exist, or a dataset card of another task (IS2RE with S2EF).
    """
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"{key} lists path(s) that do not exist: {missing}")
    datasets = [open_one(p) for p in paths]
    for path, dataset in zip(paths, datasets, strict=True):
        found = (dataset.metadata or {}).get("task", task)
        if found != task:
            raise ValueError(
                f"{key} entry {path} holds {found} records but this data module reads {task}; "
                "every dataset of a run must be of the same task"
            )
    return datasets
