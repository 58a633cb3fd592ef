"""Damage stored datasets on purpose: flip bits inside a record's bytes in the LMDB file itself.

The record layout is parsed here from its documented form (``b"MSML" | uint16 version | uint32
header length | JSON header | arrays``, little-endian), not through matsciml's decoder, so the
damage lands where a disk error would: in ``data.mdb``'s bytes, behind LMDB's back.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import lmdb
import numpy as np

_PREFIX = struct.Struct("<4sHI")


def record_value(shard: Path, key: int | str) -> bytes:
    env = lmdb.open(str(shard), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            value = txn.get(str(key).encode())
    finally:
        env.close()
    assert value is not None, f"{shard} has no key {key}"
    return value


def field_offset(value: bytes, field: str) -> int:
    """Byte offset of array ``field`` inside one encoded record value."""
    _, _, head_len = _PREFIX.unpack_from(value)
    offset = _PREFIX.size + head_len
    for name, dtype, shape in json.loads(value[_PREFIX.size : offset]):
        if name == field:
            return offset
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        offset += nbytes + (-nbytes % 8)
    raise KeyError(field)


def flip_bit(shard: Path, key: int | str, offset: int, bit: int) -> None:
    """Flip bit ``bit`` of byte ``offset`` of record ``key``'s value, in place in the file.

    ``offset`` may be negative (from the value's end). LMDB copies pages on write, so a freed
    page can still hold an old copy of the value; every copy is flipped, the live one among them.
    """
    value = record_value(shard, key)
    data = bytearray(shard.read_bytes())
    starts = [i for i in range(len(data)) if data.startswith(value, i)]
    assert starts, f"record {key} is not stored contiguously in {shard}"
    for start in starts:
        data[start + offset % len(value)] ^= 1 << bit
    with shard.open("r+b") as file:  # same size, in place: what a disk error does
        file.write(data)


def rewrite_record(shard: Path, key: int | str, value: bytes) -> None:
    """Replace one record's value through LMDB: a valid edit that only the content hash notices."""
    env = lmdb.open(str(shard), subdir=False, lock=False, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            txn.put(str(key).encode(), value)
    finally:
        env.close()


def delete_record(shard: Path, key: int | str) -> None:
    env = lmdb.open(str(shard), subdir=False, lock=False, map_size=1 << 30)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(str(key).encode())
    finally:
        env.close()
