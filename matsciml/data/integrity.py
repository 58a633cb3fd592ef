"""Integrity of a stored dataset beyond single records: its shard set and its content hash.

Three checks, cheapest first:

* every record of codec version >= 2 ends in a CRC-32, verified on each read
  (:func:`matsciml.data.formats.store.decode`);
* when a directory opens, its shard files are compared with the card
  (:func:`check_shard_set`): a lost, stray, reordered or resized shard is an error, so no run
  trains on two thirds of a split unawares;
* ``matsciml data check --verify`` recomputes the card's SHA-256 content hash over every
  stored byte (:func:`verify_content_hash`).

Legacy OC20 files have none of these: :func:`integrity_notes` says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards, store

#: Keys besides the records in every matsciml shard (``metadata`` and ``natoms``).
RESERVED_KEYS = 2


class ShardLike(Protocol):
    path: Path
    card: dict | None
    entries: int


def check_shard_set(folder: Path, shards: Sequence[ShardLike]) -> None:
    """Compare a directory's shard files with its dataset card.

    The card lists every shard's name and record count (``shards``); cards written before
    the list existed give the shard count (``num_shards``) and each shard its own index,
    which is checked instead.

    Raises:
        DataError: naming ``folder`` and the shard that is missing, extra, out of order, from
            another dataset, or holds another number of records than the card says.
    """
    carded = [s for s in shards if s.card is not None]
    if not carded:
        return  # legacy OC20: no card to compare with
    card = carded[0].card
    listed = card.get("shards") or _unlisted_shards(int(card["num_shards"]))
    summary = f"the card lists {len(listed)} shard(s) holding {card['num_records']} records"
    seen: dict[int, ShardLike] = {}
    for shard in shards:
        name = shard.path.name
        if shard.card is None:
            raise DataError(folder, f"{name} is not a shard of this matsciml dataset ({summary}): move it elsewhere")
        own = shard.card["shard"]
        if shard.card.get("content_hash") != card.get("content_hash"):
            raise DataError(
                folder, f"{name} belongs to another dataset (content hash differs from {carded[0].path.name}'s)"
            )
        index = int(own["index"])
        if index in seen:
            raise DataError(folder, f"{name} is a second copy of shard {own['name']} ({seen[index].path.name})")
        if not 0 <= index < len(listed):
            raise DataError(folder, f"{name} is not one of the card's shards ({summary}): move it elsewhere")
        seen[index] = shard
        # the dataset card's count, else the shard's own; LMDB counts the keys without a pass
        expected = int(own["count"] if listed[index]["count"] is None else listed[index]["count"])
        for count in (int(own["count"]), shard.entries - RESERVED_KEYS):
            if count != expected:
                raise DataError(
                    folder, f"shard {name} holds {count} records, the card says {expected}: restore it from a good copy"
                )
    missing = [i for i in range(len(listed)) if i not in seen]
    if missing:
        names = ", ".join(listed[i]["name"] or f"index {i}" for i in missing)
        present = sum(int(s.card["shard"]["count"]) for s in shards)
        raise DataError(
            folder,
            f"shard(s) {names} missing: {summary}, the folder has {len(shards)} holding {present}; "
            "restore the missing file(s) from the original dataset",
        )
    # records are numbered in file-name order: renamed files may be fine, reordered ones are not
    if any(int(shard.card["shard"]["index"]) != position for position, shard in enumerate(shards)):
        files = ", ".join(shard.path.name for shard in shards)
        held = ", ".join(shard.card["shard"]["name"] for shard in shards)
        raise DataError(
            folder, f"shard files out of order: {files} hold shards {held}; give the files back their names"
        )


def _unlisted_shards(num_shards: int) -> list[dict]:
    """The shard list of a card written before it had one: a writer of several shards named them
    ``data.NNNN.lmdb`` by index; their counts are in the shards' own cards only."""
    return [{"name": f"data.{i:04d}.lmdb" if num_shards > 1 else None, "count": None} for i in range(num_shards)]


def verify_content_hash(path: str | Path) -> str:
    """Recompute the SHA-256 over every record key and value, as :class:`store.DatasetWriter` did.

    Returns:
        The verified ``"sha256:<hex>"``.

    Raises:
        DataError: the dataset is not in matsciml's format, or its records hash to another value.
    """
    paths = lmdb_shards.shard_paths(path)
    cards = [store.read_metadata(lmdb_shards.reader(p), p) for p in paths]
    if any(card is None or not card.get("content_hash") for card in cards):
        raise DataError(path, "no content hash to verify: not a matsciml dataset (legacy OC20 files have none)")
    digest = hashlib.sha256()
    for shard, card in zip(paths, cards, strict=True):
        with lmdb_shards.reader(shard).begin() as txn:
            for index in range(int(card["shard"]["count"])):
                key = lmdb_shards.record_key(index)
                value = txn.get(key)
                if value is None:
                    raise DataError(shard, "record is missing", index)
                digest.update(key)
                digest.update(value)
    computed, expected = "sha256:" + digest.hexdigest(), cards[0]["content_hash"]
    if computed != expected:
        raise DataError(
            path,
            f"content hash mismatch: the card says {expected}, the records hash to {computed}; "
            "records changed after the dataset was written",
        )
    return computed


def integrity_notes(card: dict | None) -> list[str]:
    """What protects a dataset with this card (``None``: legacy OC20), one line per check."""
    if card is None:
        return ["no per-record checksums and no card (legacy OC20 pickle LMDB): only damage that breaks a record shows"]
    version = int(card.get("codec_version", 1))
    notes = [
        f"CRC-32 of every record verified on read (codec v{version})"
        if version >= store.CHECKSUM_VERSION
        else f"no per-record checksums (codec v{version})"
    ]
    if card.get("shards"):
        notes.append(f"shard files match the card's shard list ({len(card['shards'])} shards)")
    else:
        notes.append(f"no shard list in the card: checked against its shard count ({card['num_shards']}) only")
    return notes
