"""Reading OC20 LMDBs (PyG 2, old PyG 1.x and Munch pickles) without PyG installed.

The synthetic files come from :mod:`helpers.oc20`, which pickles stand-in classes under
PyG's and munch's names. ``fixtures/oc20_pyg2_real.lmdb`` was written by real
``torch_geometric`` 2.8.1 ``Data`` objects with ``fixtures/make_pyg2_fixture.py`` (see its
docstring for the command); its expected values come from that script's
``fixture_records``, which needs only torch.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import os
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.oc20 import (
    STYLES,
    is2re_record,
    pickle_record,
    s2ef_record,
    write_oc20_lmdb,
    write_oc20_shards,
    write_raw_lmdb,
)

from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards, oc20
from matsciml.data.formats.safe_pickle import safe_loads
from matsciml.data.records import validate_record

FIXTURES = Path(__file__).parent / "fixtures"


def _read(path: Path, index: int) -> dict[str, np.ndarray]:
    with lmdb_shards.reader(path).begin() as txn:
        return oc20.decode(txn.get(lmdb_shards.record_key(index)), path, index)


def _length(path: Path) -> int:
    return oc20.shard_length(lmdb_shards.reader(path), path)


def _assert_s2ef(out: dict[str, np.ndarray], record: dict) -> None:
    assert set(out) == {
        K.POSITIONS,
        K.CELL,
        K.ATOMIC_NUMBERS,
        K.NATOMS,
        K.TAGS,
        K.FIXED,
        K.ENERGY,
        K.FORCES,
        K.SID,
        K.FID,
    }
    np.testing.assert_array_equal(out[K.POSITIONS], record["pos"].numpy())
    assert out[K.POSITIONS].dtype == np.float32
    np.testing.assert_array_equal(out[K.CELL], record["cell"].numpy())
    assert out[K.CELL].shape == (1, 3, 3)
    np.testing.assert_array_equal(out[K.ATOMIC_NUMBERS], record["atomic_numbers"].numpy())
    assert out[K.ATOMIC_NUMBERS].dtype == np.float32  # as stored; validate_record casts
    np.testing.assert_array_equal(out[K.TAGS], record["tags"].numpy())
    np.testing.assert_array_equal(out[K.FIXED], record["fixed"].numpy())
    np.testing.assert_array_equal(out[K.FORCES], record["force"].numpy())
    assert out[K.ENERGY] == record["y"] and out[K.NATOMS] == record["natoms"]
    assert out[K.SID] == record["sid"] and out[K.FID] == record["fid"]


@pytest.mark.parametrize("module", ["torch_geometric", "munch"])
def test_neither_pyg_nor_munch_is_installed(module):
    with pytest.raises(ImportError):
        importlib.import_module(module)


def test_writer_leaves_no_fake_modules_behind():
    pickle_record(s2ef_record(), "pyg2")
    pickle_record(s2ef_record(), "munch")
    assert not {"torch_geometric", "torch_geometric.data.data", "munch"} & set(sys.modules)


@pytest.mark.parametrize("style", STYLES)
def test_s2ef_record_is_read_exactly(tmp_path, style):
    records = [s2ef_record(natoms=5, sid=11, fid=3, seed=1), s2ef_record(natoms=3, sid=12, seed=2)]
    path = write_oc20_lmdb(tmp_path / "data.0000.lmdb", records, style=style)
    for index, record in enumerate(records):
        _assert_s2ef(_read(path, index), record)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_pickle_protocols(style, protocol):
    # OCP wrote protocol=-1 (4 or 5); 0-2 go through copyreg / _codecs, which are allowed narrowly.
    record = s2ef_record(natoms=4, sid=5, fid=6)
    out = oc20.decode(pickle_record(record, style, protocol), "f.lmdb", 0)
    _assert_s2ef(out, record)


def test_lazily_negated_tensor_is_resolved():
    record = s2ef_record(natoms=2)
    record["force"] = torch._neg_view(torch.ones(2, 3))
    out = oc20.decode(pickle_record(record), "f.lmdb", 0)
    np.testing.assert_array_equal(out[K.FORCES], -np.ones((2, 3), dtype=np.float32))


def test_old_pyg_none_placeholders_and_internals_are_dropped():
    record = s2ef_record()
    del record["edge_index"]  # so PyG 1.x leaves edge_index=None
    data = pickle_record(record, "pyg1")
    raw = safe_loads(data).__dict__  # the pickle does carry the placeholders
    assert raw["x"] is None and raw["edge_index"] is None and "__num_nodes__" in raw
    out = oc20.decode(data, "f.lmdb", 0)
    assert not {"x", "edge_attr", "normal", "face", "__num_nodes__", "edge_index"} & set(out)


@pytest.mark.parametrize("style", STYLES)
def test_is2re_fields_are_renamed(style):
    record = is2re_record(natoms=4, sid=77, seed=1)
    out = oc20.decode(pickle_record(record, style), "data.lmdb", 0)
    np.testing.assert_array_equal(out[K.POSITIONS], record["pos"].numpy())
    np.testing.assert_array_equal(out[K.RELAXED_POSITIONS], record["pos_relaxed"].numpy())
    assert out[K.INITIAL_ENERGY] == record["y_init"] and out[K.RELAXED_ENERGY] == record["y_relaxed"]
    assert K.ENERGY not in out and out[K.SID] == 77
    assert not {"pos", "pos_relaxed", "y_init", "y_relaxed", "force"} & set(out)
    valid = validate_record(out, "data.lmdb", 0, task="is2re")
    assert valid[K.RELAXED_ENERGY].dtype == np.float32 and valid[K.RELAXED_ENERGY].shape == ()


def test_graph_fields_are_dropped_and_validation_passes():
    out = oc20.decode(pickle_record(s2ef_record(natoms=4)), "f.lmdb", 0)
    assert not oc20.GRAPH_FIELDS & set(out)
    valid = validate_record(out, "f.lmdb", 0, task="s2ef")
    assert valid[K.CELL].shape == (3, 3) and valid[K.ATOMIC_NUMBERS].dtype == np.int64
    assert valid[K.ATOMIC_NUMBERS].tolist() == [29, 29, 29, 8]
    assert valid[K.FIXED].tolist() == [True, True, False, False]


def test_fairchem_names_win_over_oc20_aliases():
    record = s2ef_record(natoms=2)
    record["energy"] = torch.tensor([3.0])
    record["forces"] = torch.zeros(2, 3)
    record["dataset"] = "oc20"  # non-numeric extras are left out
    record["sid"] = "random1234"  # string ids are left out, not an error
    out = oc20.decode(pickle_record(record, "pyg2"), "f.lmdb", 0)
    assert out[K.ENERGY].tolist() == [3.0] and not out[K.FORCES].any()
    assert "dataset" not in out and K.SID not in out


def test_non_numeric_geometry_is_a_data_error():
    record = s2ef_record(natoms=2)
    record["pos"] = "not positions"
    with pytest.raises(DataError, match=r"f\.lmdb, record 4: .*'pos'"):
        oc20.decode(pickle_record(record), "f.lmdb", 4)


def test_real_pyg2_fixture():
    spec = importlib.util.spec_from_file_location("make_pyg2_fixture", FIXTURES / "make_pyg2_fixture.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = FIXTURES / "oc20_pyg2_real.lmdb"
    records = script.fixture_records()
    assert _length(path) == len(records)
    for index, record in enumerate(records):
        _assert_s2ef(_read(path, index), record)


def test_length_key_is_used(tmp_path):
    path = write_oc20_lmdb(tmp_path / "a.lmdb", [s2ef_record()] * 3, length_key=True)
    assert _length(path) == 3


def test_without_length_key_numeric_keys_are_counted(tmp_path):
    items = {lmdb_shards.record_key(i): pickle_record(s2ef_record()) for i in range(4)}
    items[b"metadata"] = b"{}"  # a non-numeric key must not count as a record
    path = write_raw_lmdb(tmp_path / "a.lmdb", items)
    assert _length(path) == 4


def test_key_gaps_and_wrong_length_are_data_errors(tmp_path):
    record = pickle_record(s2ef_record())
    gap = write_raw_lmdb(tmp_path / "gap.lmdb", {b"0": record, b"2": record})
    with pytest.raises(DataError, match="key 1 is missing"):
        _length(gap)
    wrong = write_raw_lmdb(tmp_path / "wrong.lmdb", {b"0": record, b"length": pickle.dumps(5)})
    with pytest.raises(DataError, match="says 5 records"):
        _length(wrong)
    bad = write_raw_lmdb(tmp_path / "bad.lmdb", {b"0": record, b"length": pickle.dumps(collections.Counter())})
    with pytest.raises(DataError, match=r"bad\.lmdb, record length: .*collections\.Counter"):
        _length(bad)


def test_records_are_in_numeric_key_order(tmp_path):
    records = [s2ef_record(natoms=2 + i % 3, sid=i, seed=i) for i in range(12)]
    path = write_oc20_lmdb(tmp_path / "data.lmdb", records, length_key=False)
    env = lmdb_shards.reader(path)
    with env.begin() as txn:
        lexical = [int(key) for key in txn.cursor().iternext(values=False)]
    assert lexical[:3] == [0, 1, 10]  # what a naive reader would see
    assert lmdb_shards.numeric_keys(env) == list(range(12))
    assert _length(path) == 12
    assert [int(_read(path, i)[K.SID]) for i in range(12)] == list(range(12))


def test_sharded_directory(tmp_path):
    shards = [[s2ef_record(sid=10 * s + i) for i in range(2 + s)] for s in range(3)]
    paths = write_oc20_shards(tmp_path / "s2ef", shards)
    assert [p.name for p in lmdb_shards.shard_paths(tmp_path / "s2ef")] == [p.name for p in paths]
    assert [_length(p) for p in paths] == [2, 3, 4]
    assert int(_read(paths[2], 3)[K.SID]) == 23


def test_os_system_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    record = s2ef_record()
    record["pos"] = Evil()
    path = write_raw_lmdb(tmp_path / "evil.lmdb", {b"0": pickle_record(record)})
    with pytest.raises(DataError, match=rf"evil\.lmdb, record 0: .*{os.system.__module__}\.system"):
        _read(path, 0)
    assert not marker.exists()


def test_unknown_class_is_named_with_file_and_record(tmp_path):
    record = s2ef_record()
    record["extra"] = collections.Counter(a=1)
    path = write_raw_lmdb(tmp_path / "data.0003.lmdb", {b"0": b"", b"7": pickle_record(record)})
    with pytest.raises(DataError) as info:
        _read(path, 7)
    message = str(info.value)
    assert "collections.Counter" in message and "data.0003.lmdb" in message and "record 7" in message
    assert info.value.record == 7 and info.value.source == str(path)


def test_malicious_storage_payload_is_harmless(tmp_path):
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    class Storage:  # what a tensor's storage pickles as, but with a hostile inner stream
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(Evil(), protocol=2),)

    record = s2ef_record()
    record["pos"] = Storage()
    with pytest.raises(DataError, match="cannot load tensor storage"):
        oc20.decode(pickle_record(record), "x.lmdb", 0)
    assert not marker.exists()


@pytest.mark.parametrize("style", STYLES)
def test_truncated_value_names_file_and_record(tmp_path, style):
    value = pickle_record(s2ef_record(), style)
    path = write_raw_lmdb(tmp_path / "cut.lmdb", {b"0": value, b"1": value[: len(value) // 2]})
    assert _read(path, 0)[K.NATOMS] == 4
    with pytest.raises(DataError, match=r"cut\.lmdb, record 1: cannot read OC20 record"):
        _read(path, 1)


def test_unexpected_top_level_object_is_a_data_error():
    with pytest.raises(DataError, match=r"f\.lmdb, record 3: no record under this key"):
        oc20.decode(None, "f.lmdb", 3)
    with pytest.raises(DataError, match="record is a list"):
        oc20.decode(pickle.dumps([1, 2]), "f.lmdb", 0)
    with pytest.raises(DataError, match="DataEdgeAttr"):
        oc20.decode(b"\x80\x02ctorch_geometric.data.data\nDataEdgeAttr\n)\x81.", "f.lmdb", 0)


@pytest.mark.parametrize("field", ["pos", "extra_unknown"])
def test_records_that_expand_in_memory_are_refused_unconverted(tmp_path, field):
    """A 0.8 MB pickle can name one list from a million places: 10^8 floats (800 MB) once converted."""
    row = [0.0] * 100
    record = s2ef_record(natoms=2)
    record[field] = [[[row] * 100] * 100] * 100  # four nested levels of shared references
    value = pickle_record(record, "pyg2")
    assert len(value) < 100_000
    path = write_raw_lmdb(tmp_path / "crafted.lmdb", {b"0": value})
    if field == "extra_unknown":  # a field matsciml does not store is dropped before any conversion
        assert "extra_unknown" not in _read(path, 0)
        return
    with pytest.raises(DataError, match=r"crafted\.lmdb, record 0: OC20 field 'pos' expands to more than") as info:
        _read(path, 0)
    assert info.value.record == 0


def test_deep_nesting_is_refused_without_recursion_error(tmp_path):
    record = s2ef_record(natoms=2)
    nested: list = [0.0]
    for _ in range(100):
        nested = [nested]
    record["force"] = nested
    path = write_raw_lmdb(tmp_path / "deep.lmdb", {b"0": pickle.dumps(record)})
    with pytest.raises(DataError, match=r"deep\.lmdb, record 0: OC20 field 'force' expands"):
        _read(path, 0)
