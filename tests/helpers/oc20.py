"""Write OC20-style LMDBs (as OCP / fairchem preprocessing did) without PyG or munch.

The pickles must name ``torch_geometric.data.data.Data`` (or ``munch.Munch``) like the
real files do. Stand-in classes carry those module and class names, and the fake modules
holding them sit in ``sys.modules`` only while pickling, so nothing else sees them.

Records are dicts with OC20 field names and torch tensors as values (``pos``, ``cell``
``[1, 3, 3]``, float ``atomic_numbers``, ``natoms``, ``tags``, ``fixed``, ``y``, ``force``,
``sid``, ``fid``; IS2RE ``y_init``, ``y_relaxed``, ``pos_relaxed``), see
:func:`s2ef_record` and :func:`is2re_record`.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lmdb
import torch

STYLES = ("pyg2", "pyg1", "munch")


def _stand_in(module: str, name: str, bases: tuple[type, ...] = (), **body: Any) -> type:
    return type(name, bases, {"__module__": module, "__qualname__": name, **body})


def _munch_getstate(self: dict) -> dict:
    return dict(self)


def _munch_setstate(self: dict, state: dict) -> None:
    self.update(state)


_Data = _stand_in("torch_geometric.data.data", "Data")
_DataEdgeAttr = _stand_in("torch_geometric.data.data", "DataEdgeAttr")
_DataTensorAttr = _stand_in("torch_geometric.data.data", "DataTensorAttr")
_GlobalStorage = _stand_in("torch_geometric.data.storage", "GlobalStorage")
_Munch = _stand_in("munch", "Munch", (dict,), __getstate__=_munch_getstate, __setstate__=_munch_setstate)

_FAKE_MODULES = {
    "torch_geometric": {},
    "torch_geometric.data": {},
    "torch_geometric.data.data": {
        "Data": _Data,
        "DataEdgeAttr": _DataEdgeAttr,
        "DataTensorAttr": _DataTensorAttr,
    },
    "torch_geometric.data.storage": {"GlobalStorage": _GlobalStorage},
    "munch": {"Munch": _Munch},
}


@contextlib.contextmanager
def fake_modules() -> Iterator[None]:
    """Make the stand-in classes findable by pickle; restores ``sys.modules`` afterwards."""
    saved = {name: sys.modules.get(name) for name in _FAKE_MODULES}
    try:
        for name, members in _FAKE_MODULES.items():
            module = types.ModuleType(name)
            module.__dict__.update(members)
            sys.modules[name] = module
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _pyg2(fields: Mapping[str, Any]) -> Any:
    # PyG 2: Data.__dict__ holds the attr classes and _store; the storage pickles its
    # parent as a strong reference (BaseStorage.__getstate__ unwraps the weakref).
    data, store = _Data(), _GlobalStorage()
    store.__dict__.update({"_mapping": dict(fields), "_parent": data})
    data.__dict__.update({"_edge_attr_cls": _DataEdgeAttr, "_tensor_attr_cls": _DataTensorAttr, "_store": store})
    return data


def _pyg1(fields: Mapping[str, Any]) -> Any:
    # PyG 1.x Data.__init__ set every named argument, None when absent, then **kwargs.
    data = _Data()
    for name in ("x", "edge_index", "edge_attr", "y", "pos", "normal", "face"):
        data.__dict__[name] = fields.get(name)
    data.__dict__.update(fields)
    data.__dict__["__num_nodes__"] = None
    return data


def pickle_record(record: Mapping[str, Any], style: str = "pyg2", protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    """Pickle one record as OCP wrote it (``style`` is one of :data:`STYLES`)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    with fake_modules():
        obj = {"pyg2": _pyg2, "pyg1": _pyg1, "munch": _Munch}[style](record)
        return pickle.dumps(obj, protocol=protocol)


def write_raw_lmdb(path: str | Path, items: Mapping[bytes, bytes]) -> Path:
    """Write key/value pairs as one ``subdir=False`` LMDB file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 30, lock=False, meminit=False)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.sync(True)
    env.close()
    return path


def write_oc20_lmdb(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    style: str = "pyg2",
    length_key: bool = True,
    protocol: int = pickle.HIGHEST_PROTOCOL,
) -> Path:
    """Write records under keys ``b"0"``, ``b"1"``, ... and (S2EF-style) a pickled ``b"length"``."""
    items = {str(i).encode("ascii"): pickle_record(r, style, protocol) for i, r in enumerate(records)}
    if length_key:
        items[b"length"] = pickle.dumps(len(records), protocol=protocol)
    return write_raw_lmdb(path, items)


def write_oc20_shards(
    directory: str | Path,
    shards: Sequence[Sequence[Mapping[str, Any]]],
    style: str = "pyg2",
    length_key: bool = True,
) -> list[Path]:
    """Write an S2EF-style directory ``data.0000.lmdb``, ``data.0001.lmdb``, ..."""
    directory = Path(directory)
    return [
        write_oc20_lmdb(directory / f"data.{i:04d}.lmdb", records, style, length_key)
        for i, records in enumerate(shards)
    ]


def s2ef_record(natoms: int = 4, sid: int = 0, fid: int = 0, seed: int = 0) -> dict[str, Any]:
    """An OC20 S2EF record: small slab with an adsorbate, typed as OCP stored it."""
    gen = torch.Generator().manual_seed(seed)
    tags = torch.zeros(natoms, dtype=torch.long)
    tags[natoms // 2 :] = 1
    tags[-1] = 2
    return {
        "pos": torch.rand(natoms, 3, generator=gen, dtype=torch.float32) * 5.0,
        "cell": torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 20.0]]]),
        "atomic_numbers": torch.tensor([29.0] * (natoms - 1) + [8.0]),  # float32, as in old files
        "natoms": natoms,
        "tags": tags,
        "fixed": (tags == 0).float(),
        "y": float(-1.25 - 0.5 * seed),
        "force": torch.randn(natoms, 3, generator=gen),
        "sid": sid,
        "fid": fid,
        "edge_index": torch.tensor([[0, 1], [1, 0]]),
        "cell_offsets": torch.zeros(2, 3),
        "distances": torch.ones(2),
    }


def is2re_record(natoms: int = 4, sid: int = 0, seed: int = 0) -> dict[str, Any]:
    """An OC20 IS2RE record: initial and relaxed positions and energies."""
    record = s2ef_record(natoms, sid=sid, seed=seed)
    del record["y"], record["fid"]
    record["pos_relaxed"] = record["pos"] + 0.1
    record["y_init"] = 3.5 + seed
    record["y_relaxed"] = -0.75 - seed
    return record
