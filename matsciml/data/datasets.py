"""Map-style datasets over LMDB shards in either supported format.

Each shard is read in its own format: matsciml's store (recognised by its ``metadata``
record) or a legacy OC20 pickle LMDB. Environments open lazily in the process that reads
them and reopen after a fork, so one dataset object serves every DataLoader worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch.utils.data

from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards, oc20, store
from matsciml.data.integrity import check_shard_set
from matsciml.data.records import Record, check_stored_record, validate_record
from matsciml.data.transforms import Compose

Transform = Callable[[Record], Record]


class _Shard:
    """One LMDB file: its format, record count and number of LMDB keys (``entries``).

    The environment comes from :func:`lmdb_shards.reader` (one per file and process);
    the shard remembers it for its own process only and drops it when pickled, so it
    reopens in DataLoader workers.
    """

    def __init__(self, path: Path):
        self.path = path
        env = lmdb_shards.reader(path)
        self._env, self._pid = env, os.getpid()
        _check_not_truncated(env, path)
        self.entries = int(env.stat()["entries"])
        self.card = store.read_metadata(env, path)
        if self.card is not None:
            self.length = int(self.card["shard"]["count"])
            self.natoms = store.read_natoms(env, path)
        else:
            self.length = oc20.shard_length(env, path)
            self.natoms = None

    @property
    def format(self) -> str:
        return store.FORMAT_NAME if self.card is not None else "oc20-pickle"

    def read(self, index: int) -> dict:
        if self._pid != os.getpid():
            self._env, self._pid = lmdb_shards.reader(self.path), os.getpid()
        with self._env.begin() as txn:
            value = txn.get(lmdb_shards.record_key(index))
        if value is None:
            raise DataError(self.path, f"record key {index} is missing (the shard claims {self.length} records)", index)
        if self.card is not None:
            return store.decode(value, self.path, index)
        return oc20.decode(value, self.path, index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": None}


def _check_not_truncated(env, path: Path) -> None:
    # LMDB memory-maps the file: reading a page past a truncated end would crash the
    # process with SIGBUS instead of raising, so compare the file size up front.
    used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = path.stat().st_size
    if size < used:
        raise DataError(path, f"LMDB file is truncated ({size} bytes on disk, {used} bytes in use)")


class LMDBDataset(torch.utils.data.Dataset):
    """Records from one LMDB file or a directory of shards, validated and transformed.

    Args:
        path: a ``.lmdb`` file or a directory of them (numeric shard order).
        transforms: callables applied in order to each validated record (e.g.
            :class:`~matsciml.data.neighbors.RadiusGraph`); a ``ValueError`` they raise is
            reported as a :class:`DataError` naming the shard and record.
        task: ``"s2ef"`` or ``"is2re"`` to require that task's targets in every record.

    Raises:
        DataError: missing path, unreadable or truncated shard, shard files that do not match
            the dataset card (:func:`~matsciml.data.integrity.check_shard_set`), or no records.
    """

    task: str | None = None

    def __init__(
        self,
        path: str | os.PathLike,
        transforms: Transform | Sequence[Transform] | None = None,
        task: str | None = None,
    ):
        self.path = Path(path)
        self.task = task if task is not None else type(self).task
        self.shards = [_Shard(p) for p in lmdb_shards.shard_paths(self.path)]
        if self.path.is_dir():  # one file named on its own is read as it is
            check_shard_set(self.path, self.shards)
        self.offsets = np.concatenate([[0], np.cumsum([s.length for s in self.shards])]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DataError(self.path, "dataset holds no records")
        if transforms is None or callable(transforms):
            self.transform = transforms
        else:
            self.transform = Compose(list(transforms))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[_Shard, int]:
        """The shard holding dataset item ``index`` and the record key inside it."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} records")
        index %= len(self)
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard], index - int(self.offsets[shard])

    def read(self, index: int) -> Record:
        """The validated record ``index``, before transforms."""
        shard, key = self.locate(index)
        if shard.card is not None:  # validated in full when written
            return check_stored_record(shard.read(key), shard.path, key, self.task)
        return validate_record(shard.read(key), shard.path, key, task=self.task)

    def __getitem__(self, index: int) -> Record:
        record = self.read(index)
        if self.transform is not None:
            try:
                record = self.transform(record)
            except DataError:
                raise
            except ValueError as err:
                shard, key = self.locate(index)
                raise DataError(shard.path, str(err), key) from err
        return record

    @property
    def metadata(self) -> dict | None:
        """The dataset card of a matsciml dataset (``None`` for legacy OC20 files)."""
        return self.shards[0].card

    def natoms(self) -> np.ndarray | None:
        """Atom count of every record, from the metadata (no pass over the data), if stored."""
        if any(s.natoms is None for s in self.shards):
            return None
        return np.concatenate([s.natoms for s in self.shards]).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, records={len(self)}, shards={len(self.shards)}, "
            f"format={self.shards[0].format}, transform={self.transform!r})"
        )


class S2EFDataset(LMDBDataset):
    """Structure to energy and forces: every record must carry ``energy`` and ``forces``."""

    task = "s2ef"


class IS2REDataset(LMDBDataset):
    """Initial structure to relaxed energy: every record must carry ``relaxed_energy``."""

    task = "is2re"
