"""matsciml's own LMDB format: OC20's directory layout, safe versioned array encoding.

Each record value is::

    b"MSML" | uint16 version | uint32 header length | JSON header | array bytes | uint32 CRC-32

where the header lists ``[name, dtype, shape]`` for each array and the bytes follow in
that order, each padded to 8 bytes. Only plain numeric and boolean dtypes are accepted,
so decoding never constructs an arbitrary object (unlike pickle). All integers are
little-endian.

The trailing CRC-32 (:func:`zlib.crc32`, codec version 2 on) covers every byte before it,
prefix included, and is checked on every read: a flipped bit or a bad copy becomes a
:class:`DataError` naming the shard and record instead of an atom moved by 1e10 Å. Every
later version keeps this trailer, so a corrupt version field is reported as corruption.
Version 1 records (the shipped devsets) have no trailer and still read, unchecked.

Each shard also holds two reserved keys:

* ``metadata``: UTF-8 JSON, the dataset card (:mod:`matsciml.data.formats.card`) plus
  this shard's index and record count;
* ``natoms``: an encoded ``int32`` array of every record's atom count, so samplers can
  balance batches without reading the records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

from matsciml.atomic import disk_full, replace_path
from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards
from matsciml.data.formats.card import DatasetStatistics
from matsciml.data.records import Record, validate_record
from matsciml.records.partials import partial_path, remove_stale_partials

MAGIC = b"MSML"
CODEC_VERSION = 2
#: The first codec version whose records end in a CRC-32 of all preceding bytes.
CHECKSUM_VERSION = 2
SCHEMA_VERSION = 1
FORMAT_NAME = "matsciml-lmdb"
METADATA_KEY = b"metadata"
NATOMS_KEY = b"natoms"
_PREFIX = struct.Struct("<4sHI")
# CRC-32, not a cryptographic hash: it catches every one- or two-bit flip and every burst of up
# to 32 bits in a record (anything else with probability 1 - 2^-32) at ~1 GB/s, which is what
# disks and copies do; deliberate edits are the business of the card's SHA-256 content hash
# (``data check --verify``), which covers the dataset as a whole.
_CRC = struct.Struct("<I")
_ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float: nothing that can hold an object
_DTYPE = re.compile(r"[<>|][biuf](1|2|4|8|16)")  # dtype.str of those kinds, as encode writes it
_MAX_NDIM = 8  # matsciml's fields have at most 2 dimensions


def encode(arrays: dict[str, np.ndarray]) -> bytes:
    """Encode named numeric arrays into one self-describing byte string."""
    header, chunks = [], []
    for name, array in arrays.items():
        array = np.asarray(array)  # not ascontiguousarray: it turns 0-d arrays into 1-d
        if array.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"field {name!r} has dtype {array.dtype}, which the store cannot hold")
        header.append([name, array.dtype.str, list(array.shape)])
        data = array.tobytes(order="C")
        chunks.append(data + b"\0" * (-len(data) % 8))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(len(head) + _PREFIX.size) % 8)
    body = _PREFIX.pack(MAGIC, CODEC_VERSION, len(head)) + head + b"".join(chunks)
    return body + _CRC.pack(zlib.crc32(body))


def decode(
    value: bytes, source: str | os.PathLike = "<bytes>", index: int | str = "?", *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Decode :func:`encode`'s output into writable arrays.

    Args:
        value: one stored record value.
        source, index: the shard file and record key, for error messages.
        verify: check the CRC-32 of version >= 2 records; ``False`` only to time the check.

    Raises:
        DataError: the bytes are truncated, corrupt (checksum mismatch), of another format
            or of a newer version.
    """
    if len(value) < _PREFIX.size:
        raise DataError(source, f"value is {len(value)} bytes, too short for a matsciml record", index)
    magic, version, head_len = _PREFIX.unpack_from(value)
    if magic != MAGIC:
        raise DataError(source, "value is not a matsciml record (bad magic bytes)", index)
    end = len(value)
    if version >= CHECKSUM_VERSION:
        end -= _CRC.size
        if end < _PREFIX.size:
            raise DataError(source, f"value is {len(value)} bytes, too short for a matsciml record", index)
        if verify:
            _verify_checksum(value, end, source, index)
    elif version < 1:
        raise DataError(source, f"record has codec version {version}, which no matsciml writes (corrupt record)", index)
    if version > CODEC_VERSION:
        raise DataError(
            source,
            f"record encoded with codec version {version}; this matsciml reads <= {CODEC_VERSION} (upgrade matsciml)",
            index,
        )
    buffer = bytearray(memoryview(value)[:end])  # one copy: writable arrays that outlive the transaction
    try:
        fields = _header(bytes(buffer[_PREFIX.size : _PREFIX.size + head_len]))
        offset = _PREFIX.size + head_len
        out = {}
        for name, dtype, shape, count in fields:
            nbytes = count * dtype.itemsize
            if offset + nbytes > len(buffer):
                raise ValueError(f"field {name!r} runs past the end of the value (truncated record)")
            out[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += nbytes + (-nbytes % 8)
    except (ValueError, TypeError, RecursionError) as err:  # RecursionError: JSON nested too deep
        raise DataError(source, f"corrupt matsciml record: {err}", index) from None
    return out


def _verify_checksum(value: bytes, end: int, source: str | os.PathLike, index: int | str) -> None:
    (stored,) = _CRC.unpack_from(value, end)
    computed = zlib.crc32(memoryview(value)[:end])
    if computed != stored:
        raise DataError(
            source,
            f"checksum mismatch (CRC-32 stored {stored:08x}, computed {computed:08x}): the record's bytes "
            "changed after it was written (disk or copy error); restore this file from a good copy",
            index,
        )


@functools.lru_cache(maxsize=1024)  # records of one dataset share a few headers (one per atom count)
def _header(text: bytes) -> tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]:
    """The checked ``(name, dtype, shape, count)`` of each field in a JSON header."""
    header = json.loads(text)
    if not isinstance(header, list):
        raise ValueError(f"header is a {type(header).__name__}, not a list of fields")
    return tuple(_field(entry) for entry in header)


def _field(entry: object) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """One header entry ``[name, dtype, shape]`` checked exactly as :func:`encode` writes it.

    Names are matsciml's stored fields, dtypes ``dtype.str`` of a bool / integer / float (matched as
    text, so numpy never parses anything else), shapes non-negative integers: a damaged header is
    refused here, not passed on as a negative or unknown shape.
    """
    if not (isinstance(entry, list) and len(entry) == 3):
        raise ValueError(f"header entry {str(entry)[:80]} is not [name, dtype, shape]")
    name, dtype_str, shape = entry
    if name not in K.STORED:
        raise ValueError(f"unknown field {str(name)[:80]!r}")
    if not (isinstance(dtype_str, str) and _DTYPE.fullmatch(dtype_str)):
        raise ValueError(f"field {name!r} has dtype {str(dtype_str)[:80]!r}, not a bool, integer or float")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"field {name!r} has shape {str(shape)[:80]}, not a list of non-negative integers")
    return name, np.dtype(dtype_str), tuple(shape), math.prod(shape)


def read_metadata(env, source: str | os.PathLike) -> dict | None:
    """The shard's metadata card, or ``None`` when the shard is not in matsciml's format."""
    with env.begin() as txn:
        raw = txn.get(METADATA_KEY)
    if raw is None or not raw.startswith(b"{"):
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataError(source, f"metadata record is not valid JSON: {err}", "metadata") from None
    if meta.get("format") != FORMAT_NAME:
        return None
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise DataError(
            source,
            f"dataset schema version {meta['schema_version']} is newer than this"
            f" matsciml reads ({SCHEMA_VERSION}); upgrade matsciml",
        )
    return meta


def read_natoms(env, source: str | os.PathLike) -> np.ndarray | None:
    with env.begin() as txn:
        raw = txn.get(NATOMS_KEY)
    return None if raw is None else decode(raw, source, NATOMS_KEY.decode())["natoms"]


class DatasetWriter:
    """Write records as a matsciml dataset, atomically.

    Records go to a hidden temporary directory beside ``destination``; only a
    successful :meth:`close` renames it into place, so an interrupted or failed write
    never leaves a dataset (or half of one) at ``destination``.

    Args:
        destination: directory to create.
        task: ``"s2ef"`` or ``"is2re"``; records are validated against it.
        records_per_shard: start a new ``data.NNNN.lmdb`` after this many records;
            ``None`` writes a single ``data.lmdb`` (the OC20 IS2RE layout).
        source: free-text description of where the data came from.
        command: the command line that created the dataset (defaults to ``sys.argv``).
        title: a human-readable name for the dataset card.
        overwrite: replace an existing dataset at ``destination``.

    Example:
        >>> with DatasetWriter("out/train", task="s2ef", records_per_shard=1000) as writer:
        ...     for record in records:
        ...         writer.add(record)
    """

    commit_every = 256

    def __init__(
        self,
        destination: str | os.PathLike,
        task: str,
        records_per_shard: int | None = None,
        source: str = "",
        command: str | None = None,
        title: str | None = None,
        overwrite: bool = False,
        license: str = "unspecified",
    ):
        if task not in K.TASK_TARGETS:
            raise ValueError(f"task must be one of {sorted(K.TASK_TARGETS)}, got {task!r}")
        if records_per_shard is not None and records_per_shard < 1:
            raise ValueError(f"records_per_shard must be a positive integer or None, got {records_per_shard}")
        self.destination = Path(destination)
        if self.destination.exists() and not overwrite:
            raise FileExistsError(f"{self.destination} already exists; pass overwrite=True to replace it")
        self.task = task
        self.records_per_shard = records_per_shard
        self.card = {
            "title": title or self.destination.name,
            "source": source,
            "command": command if command is not None else " ".join(sys.argv),
            "license": license,
        }
        self.overwrite = overwrite
        remove_stale_partials(self.destination)  # left by a writer that was killed (kill -9, out of memory)
        self._tmp = partial_path(self.destination)
        self._stats = DatasetStatistics(task)
        self._hash = hashlib.sha256()
        self._shards: list[dict] = []  # per shard: path, count, natoms list
        self._env = self._txn = None
        self._closed = False

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException as err:
                self.fail(err)
                raise
        else:
            self.fail(exc)

    # -- writing ------------------------------------------------------------------------
    def add(self, record: Record, source: str | os.PathLike = "<input>", index: int | str = "?") -> None:
        """Validate and append one record.

        Readers trust what this wrote, so every record is checked here, once
        (:func:`~matsciml.data.records.validate_record`).

        Args:
            record: field name -> array.
            source, index: where the record came from, for error messages.
        """
        if self._closed:
            raise RuntimeError("writer is closed")
        record = validate_record(record, source, index, task=self.task)
        shard = self._current_shard()
        index = shard["count"]
        stored = {name: record[name] for name in K.STORED if name in record}
        value = encode(stored)
        key = lmdb_shards.record_key(index)
        self._txn.put(key, value)
        self._hash.update(key)
        self._hash.update(value)
        self._stats.add(stored)
        shard["count"] += 1
        shard["natoms"].append(int(stored[K.NATOMS]))
        if shard["count"] % self.commit_every == 0:
            self._txn.commit()
            self._txn = self._env.begin(write=True)

    def _current_shard(self) -> dict:
        full = (
            self.records_per_shard is not None
            and self._shards
            and (self._shards[-1]["count"] >= self.records_per_shard)
        )
        if self._env is None or full:
            self._finish_shard()
            if not self._shards:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp.mkdir(parents=True)
            name = "data.lmdb" if self.records_per_shard is None else f"data.{len(self._shards):04d}.lmdb"
            self._shards.append({"name": name, "count": 0, "natoms": []})
            self._env = lmdb_shards.open_write(self._tmp / name)
            self._txn = self._env.begin(write=True)
        return self._shards[-1]

    def _finish_shard(self) -> None:
        if self._env is not None:
            shard = self._shards[-1]
            self._txn.put(NATOMS_KEY, encode({"natoms": np.asarray(shard["natoms"], dtype=np.int32)}))
            self._txn.commit()
            self._env.sync(True)
            self._env.close()
            self._env = self._txn = None

    def close(self) -> dict:
        """Finish every shard, write the metadata cards, and move the dataset into place.

        Returns:
            The dataset card that was written.
        """
        if self._closed:
            raise RuntimeError("writer is already closed")
        if not self._shards:
            self.abort()
            raise DataError(self.destination, "no records were written; refusing to create an empty dataset")
        self._finish_shard()
        card = self.metadata()
        for index, shard in enumerate(self._shards):
            env = lmdb_shards.open_write(self._tmp / shard["name"])
            with env.begin(write=True) as txn:
                shard_card = dict(card, shard={"index": index, "name": shard["name"], "count": shard["count"]})
                txn.put(METADATA_KEY, json.dumps(shard_card, indent=1).encode())
            env.sync(True)
            env.close()
        # an old dataset is swapped for the new one in one step: readers see one or the other
        replace_path(self._tmp, self.destination) if self.overwrite else os.replace(self._tmp, self.destination)
        self._closed = True
        return card

    def fail(self, err: BaseException) -> None:
        """:meth:`abort` after ``err``; raises :class:`~matsciml.atomic.DiskFullError` if the disk is full."""
        full = disk_full(err, self.destination)  # judged before abort() frees the space
        self.abort()
        if full is not None:
            raise full from err

    def abort(self) -> None:
        """Drop everything written so far; ``destination`` is left untouched."""
        if self._env is not None:
            self._txn.abort()
            self._env.close()
            self._env = self._txn = None
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def metadata(self) -> dict:
        from matsciml import __version__

        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "codec_version": CODEC_VERSION,
            "task": self.task,
            **self.card,
            "matsciml_version": __version__,
            "num_records": sum(s["count"] for s in self._shards),
            "num_shards": len(self._shards),
            # checked whenever the dataset opens (matsciml.data.integrity): a lost or stray shard is an error
            "shards": [{"name": s["name"], "count": s["count"]} for s in self._shards],
            "units": {"energy": "eV", "length": "Å", "forces": "eV/Å", "stress": "eV/Å^3"},
            "content_hash": "sha256:" + self._hash.hexdigest(),
            **self._stats.summary(),
        }
