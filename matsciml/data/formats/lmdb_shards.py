"""The LMDB directory layout shared by OC20 and matsciml datasets.

A dataset is either one LMDB file or a directory of them (``data.0000.lmdb``,
``data.0001.lmdb``, ... for S2EF; ``data.lmdb`` for IS2RE). Each file is opened with
``subdir=False`` and holds records under ASCII decimal keys counted from 0.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import lmdb

from matsciml.data.errors import DataError

LMDB_SUFFIX = ".lmdb"


def shard_paths(path: str | Path) -> list[Path]:
    """The LMDB files of a dataset, in shard order (numeric, not lexical).

    Raises:
        DataError: the path does not exist or holds no ``.lmdb`` file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such dataset file or directory")
    files = [p for p in path.iterdir() if p.suffix == LMDB_SUFFIX and p.is_file()]
    if not files:
        raise DataError(path, "directory holds no .lmdb files")
    return sorted(files, key=_shard_sort_key)


def _shard_sort_key(path: Path) -> tuple:
    # data.2.lmdb must come before data.10.lmdb
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _open_read(path: Path) -> lmdb.Environment:
    try:
        return lmdb.open(
            str(path),
            subdir=False,
            readonly=True,
            lock=False,
            readahead=False,
            meminit=False,
            max_readers=512,
        )
    except lmdb.Error as err:
        raise DataError(path, f"cannot open as LMDB ({err}); the file is corrupt or not an LMDB") from None


# One read-only environment per shard file and process. py-lmdb refuses to open a file
# twice in one process (two datasets over the same split would collide), and its record
# of open files survives fork(), so a DataLoader worker cannot reopen a file its parent
# had open until it closes the inherited copy.
_readers: dict[tuple[int, int], tuple[int, tuple[int, int], lmdb.Environment]] = {}


def reader(path: str | os.PathLike) -> lmdb.Environment:
    """The process-wide read-only environment of one shard, opened on first use.

    Shared by every reader in the process: do not close it. An environment inherited
    through ``fork`` is closed (in the child only) and reopened, since LMDB environments
    must not be used across a fork; so is one whose file changed size or modification
    time (a replaced file can reuse a deleted file's inode number).

    Raises:
        DataError: the file is missing or is not an LMDB.
    """
    path = Path(path)
    try:
        stat = os.stat(path)
    except OSError as err:
        raise DataError(path, f"cannot read shard: {err.strerror}") from None
    key, signature = (stat.st_dev, stat.st_ino), (stat.st_size, stat.st_mtime_ns)
    cached = _readers.pop(key, None)
    if cached is not None:
        owner, cached_signature, env = cached
        if owner == os.getpid() and cached_signature == signature:
            _readers[key] = cached
            return env
        env.close()
    env = _open_read(path)
    _readers[key] = (os.getpid(), signature, env)
    return env


def open_write(path: Path, map_size: int = 1 << 40) -> lmdb.Environment:
    """Create one shard for writing. ``map_size`` is virtual: the file grows as needed."""
    return lmdb.open(
        str(path),
        subdir=False,
        map_size=map_size,
        meminit=False,
        lock=False,
    )


def record_key(index: int) -> bytes:
    return str(index).encode("ascii")


def numeric_keys(env: lmdb.Environment) -> list[int]:
    """All decimal keys of a shard, sorted numerically (used when no length is recorded)."""
    with env.begin() as txn:
        return sorted(int(k) for k in txn.cursor().iternext(values=False) if k.isdigit())
