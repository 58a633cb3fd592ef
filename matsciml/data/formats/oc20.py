"""Reading OpenCatalyst (OC20) LMDB records as the OCP / fairchem preprocessing wrote them.

Each value is a pickled ``torch_geometric.data.Data`` (old PyG 1.x layout with the
fields in ``__dict__``, or PyG 2 with them in ``_store._mapping``), or occasionally a
``munch.Munch``. :func:`decode` unpickles one with
:func:`~matsciml.data.formats.safe_pickle.safe_loads`, so neither PyG nor munch is needed
and a crafted file cannot run code, then renames OC20's fields to matsciml's keys
(:mod:`matsciml.data.keys`) and drops precomputed graph fields: matsciml builds graphs on
the fly. The directory layout (shards, numeric keys) is :mod:`lmdb_shards`'.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import lmdb
import numpy as np
import torch

from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards
from matsciml.data.formats.safe_pickle import MunchState, PickledState, PygData, safe_loads

#: Reserved key of S2EF shards: the pickled number of records.
LENGTH_KEY = b"length"

#: OC20 field name -> matsciml key, for names that differ. Fields already named as in
#: matsciml (cell, natoms, tags, fixed, sid, fid, and fairchem's newer energy, forces,
#: stress, pbc) keep their names and win over an alias for the same key.
RENAMES: dict[str, str] = {
    "pos": K.POSITIONS,
    "y": K.ENERGY,
    "force": K.FORCES,
    "y_init": K.INITIAL_ENERGY,
    "y_relaxed": K.RELAXED_ENERGY,
    "pos_relaxed": K.RELAXED_POSITIONS,
}

#: Precomputed graph / batching fields, dropped: they depend on a cutoff matsciml sets itself.
GRAPH_FIELDS = frozenset(
    {
        "edge_index",
        "cell_offsets",
        "distances",
        "neighbors",
        "offsets",
        "edge_attr",
        "edge_weight",
        "edge_distance_vec",
        "x",
        "batch",
        "ptr",
        "face",
        "normal",
        "num_nodes",
    }
)

_IDS = (K.SID, K.FID)

#: The most numbers one record may decode to (all fields together; OC20's largest records hold a
#: few thousand). A pickle can reference one list from many places, so a small value could
#: otherwise expand to gigabytes when turned into arrays.
MAX_RECORD_ELEMENTS = 1 << 24
_MAX_DEPTH = 32  # numpy's arrays have at most 64 dimensions; OC20's at most 3
_END = object()


def decode(value: bytes | None, source: str | os.PathLike = "<bytes>", index: int | str = "?") -> dict[str, np.ndarray]:
    """Safely unpickle one OC20 record into arrays under matsciml's field names.

    The result is not validated (the dataset layer calls
    :func:`~matsciml.data.records.validate_record`): ``atomic_numbers`` keeps OC20's float
    values, ``cell`` its ``(1, 3, 3)`` shape. Fields matsciml does not store (graph fields,
    extras such as a dataset name) are dropped before anything is converted, as is a ``sid`` /
    ``fid`` that is not a number (some datasets use strings). The fields kept are counted
    before conversion: a record past :data:`MAX_RECORD_ELEMENTS` numbers is refused.

    Args:
        value: the LMDB value (a pickle).
        source: file the value came from (for error messages).
        index: its key in that file (for error messages).

    Raises:
        DataError: the value is truncated, names a class outside the safe allow-list, is
            not a PyG ``Data`` / ``Munch`` / ``dict`` record, or expands past
            :data:`MAX_RECORD_ELEMENTS` numbers.
    """
    if value is None:  # what txn.get returns for a missing key
        raise DataError(source, "no record under this key (the shard is shorter than its length says)", index)
    try:
        obj = safe_loads(value)
    except pickle.UnpicklingError as err:
        raise DataError(source, f"cannot read OC20 record: {err}", index) from None
    fields = _fields(obj, source, index)

    out: dict[str, np.ndarray] = {}
    aliased: dict[str, np.ndarray] = {}
    budget = MAX_RECORD_ELEMENTS
    for name, raw in fields.items():
        key = RENAMES.get(name, name) if isinstance(name, str) else None
        if raw is None or key not in K.STORED or name in GRAPH_FIELDS:
            continue  # PyG 1.x None placeholders, PyG internals, graph fields, extras: never converted
        budget -= _count_elements(raw, budget)
        if budget < 0:
            raise DataError(
                source,
                f"OC20 field {name!r} expands to more than {MAX_RECORD_ELEMENTS} numbers "
                "in this record (repeated references or nesting); the record is refused",
                index,
            )
        try:
            array = _to_numpy(raw)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(source, f"OC20 field {name!r} cannot be read as an array: {err}", index) from None
        if array is None or array.dtype.kind not in "biuf":
            if key in K.FIELDS and key not in _IDS:
                raise DataError(source, f"OC20 field {name!r} holds a {type(raw).__name__}, not numbers", index)
            continue  # string ids and extras such as a dataset name
        (aliased if name in RENAMES else out)[key] = array
    for key, array in aliased.items():
        out.setdefault(key, array)
    return out


def _fields(obj: Any, source: str | os.PathLike, index: int | str) -> Mapping[str, Any]:
    """The field mapping of an unpickled record, whichever container wrote it."""
    if isinstance(obj, (dict, MunchState)):
        return obj
    if isinstance(obj, PygData):
        state = obj.__dict__
        if "_store" not in state:
            return state  # PyG 1.x: fields straight in __dict__
        mapping = getattr(state["_store"], "__dict__", {}).get("_mapping")
        if isinstance(mapping, dict):
            return mapping
        raise DataError(source, "PyG 2 Data record has no field mapping in its _store", index)
    kind = obj.origin if isinstance(obj, PickledState) else type(obj).__name__
    raise DataError(source, f"OC20 record is a {kind}, expected a torch_geometric Data, Munch or dict", index)


def _count_elements(value: Any, limit: int) -> int:
    """The numbers ``value`` would convert to, counted without converting; stops once past ``limit``.

    Counts every reference again, as conversion would copy it; iterative, so deep nesting is no
    recursion error (nesting past ``_MAX_DEPTH`` counts as past the limit).
    """
    count, stack = 0, [iter((value,))]  # iterators, so a list of a million references is not copied
    while stack and count <= limit:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, torch.Tensor):
            count += item.numel()
        elif isinstance(item, np.ndarray):
            count += item.size
        elif isinstance(item, (np.generic, bool, int, float)):
            count += 1
        elif isinstance(item, (list, tuple)):
            if len(stack) > _MAX_DEPTH:
                return limit + 1
            count += not item  # an empty list holds no number but still costs a step to convert
            stack.append(iter(item))
    return count


def _to_numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().resolve_conj().resolve_neg()  # numpy() refuses lazy conj/neg views
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(value)
    if isinstance(value, (list, tuple)):
        try:
            return np.asarray([_to_numpy(v) for v in value])
        except ValueError:  # ragged
            return None
    return None


def shard_length(env: lmdb.Environment, source: str | os.PathLike) -> int:
    """Number of records in one OC20 shard.

    Uses the pickled ``length`` key when present (checked against the last record key);
    otherwise counts the decimal keys, which must run 0, 1, ... without gaps, since
    records are read by index.

    Raises:
        DataError: the length key is unreadable or disagrees with the keys present, or
            the keys have a gap.
    """
    with env.begin() as txn:
        raw = txn.get(LENGTH_KEY)
        if raw is not None:
            try:
                length = safe_loads(raw)
            except pickle.UnpicklingError as err:
                raise DataError(source, f"cannot read the length key: {err}", "length") from None
            if isinstance(length, (torch.Tensor, np.ndarray, np.integer)) and np.size(length) == 1:
                length = int(np.asarray(length).reshape(()))
            if type(length) is not int or length < 0:
                raise DataError(source, f"length key holds {length!r}, not a count", "length")
            if length and txn.get(lmdb_shards.record_key(length - 1)) is None:
                raise DataError(source, f"length key says {length} records but key {length - 1} is missing")
            return length
    keys = lmdb_shards.numeric_keys(env)
    if keys != list(range(len(keys))):
        gap = next(i for i, k in enumerate(keys) if k != i)
        raise DataError(source, f"record keys are not 0..{len(keys) - 1}: key {gap} is missing")
    return len(keys)
