"""A dataset's digest for step records, from its metadata records: no pass over the data.

* matsciml's format: the ``content_hash`` its writer computed over every record (in each
  shard's metadata card), so equal digests mean equal records.
* legacy OC20 LMDBs: a sha256 over each shard's name, size and record count (its ``length``
  key). This identifies the files as written, not their content: a rewritten shard with the
  same size and count would go unnoticed.
"""

from __future__ import annotations

import hashlib
import os

from matsciml.data.formats import lmdb_shards, oc20, store


def dataset_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` identifying the dataset (file or directory of shards) at ``path``.

    Raises:
        DataError: the path holds no readable LMDB.
    """
    shards = lmdb_shards.shard_paths(path)
    meta = store.read_metadata(lmdb_shards.reader(shards[0]), shards[0])
    if meta is not None and meta.get("content_hash"):
        return meta["content_hash"]
    digest = hashlib.sha256(b"oc20-lmdb-metadata-v1")
    for shard in shards:
        count = oc20.shard_length(lmdb_shards.reader(shard), shard)
        digest.update(f"{shard.name}\0{shard.stat().st_size}\0{count}\n".encode())
    return "sha256:" + digest.hexdigest()
