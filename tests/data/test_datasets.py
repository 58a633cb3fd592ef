"""Datasets over sharded LMDBs: order, laziness across forks, and one clear error per bad input."""

import os
import pickle

import lmdb
import numpy as np
import pytest
import torch
from helpers.structures import slab_record, write_dataset

from matsciml.data.datasets import IS2REDataset, LMDBDataset, S2EFDataset
from matsciml.data.errors import DataError
from matsciml.data.formats import lmdb_shards, store
from matsciml.data.neighbors import RadiusGraph


def test_records_come_back_in_shard_then_key_order(s2ef_path):
    dataset = S2EFDataset(s2ef_path)
    assert len(dataset) == 12 and [s.length for s in dataset.shards] == [5, 5, 2]
    for index in range(12):
        expected = slab_record(index, metal=("Cu", "Pt", "Ag", "Au")[index % 4])
        got = dataset[index]
        assert int(got["sid"]) == index
        assert np.array_equal(got["positions"], expected["positions"])
        assert np.array_equal(got["forces"], expected["forces"])
    assert np.array_equal(dataset.natoms(), np.full(12, 13))
    assert dataset.metadata["num_records"] == 12 and dataset.metadata["task"] == "s2ef"


def test_shards_sort_numerically_not_lexically(tmp_path):
    root = write_dataset(tmp_path / "ds", 11, records_per_shard=1)
    names = [p.name for p in lmdb_shards.shard_paths(root)]
    assert names[:3] == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]
    for p in root.iterdir():  # rename to unpadded numbers: data.10 must still come last
        p.rename(root / p.name.replace(".00", ".").replace(".0", ".") if p.name != "data.0000.lmdb" else p)
    dataset = LMDBDataset(root)
    assert [int(dataset[i]["sid"]) for i in range(11)] == list(range(11))


def test_dataset_pickles_and_reopens_after_fork_even_when_the_parent_has_read(s2ef_path):
    dataset = S2EFDataset(s2ef_path, transforms=[RadiusGraph()])
    dataset[0]  # opens an environment in this process
    clone = pickle.loads(pickle.dumps(dataset))  # a second dataset over the same files
    assert np.array_equal(clone[7]["edge_index"], dataset[7]["edge_index"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list)
    sids = [int(r["sid"]) for batch in loader for r in batch]
    assert sids == list(range(12))


def test_task_targets_are_required(is2re_path):
    assert len(IS2REDataset(is2re_path)) == 6
    with pytest.raises(DataError, match=r"data.lmdb, record 0: missing required field\(s\) \['energy', 'forces'\]"):
        S2EFDataset(is2re_path)[0]


# --- bad input: each gives one DataError naming the file and record -----------------------
def _write_raw(path, values: dict[bytes, bytes], card: dict | None = None):
    env = lmdb_shards.open_write(path)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    return path


def _store_with(tmp_path, **overrides):
    record = slab_record(0)
    path = write_dataset(tmp_path / "ok", 1)
    record.update(overrides)
    env = lmdb.open(str(path / "data.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", store.encode({k: np.asarray(v) for k, v in record.items() if v is not None}))
    env.close()
    return path / "data.lmdb"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"positions": np.full((13, 3), np.nan)}, "positions holds NaN or inf"),
        ({"positions": np.zeros((13, 2))}, r"positions must have shape \(num_atoms, 3\)"),
        ({"positions": np.zeros((0, 3)), "atomic_numbers": np.zeros(0)}, "structure has zero atoms"),
        ({"forces": np.zeros((12, 3))}, r"forces must have shape \(num_atoms, 3\), got \(12, 3\)"),
        ({"energy": np.float32(np.inf)}, "energy holds NaN or inf"),
        ({"atomic_numbers": np.full(13, 200)}, "atomic numbers must lie in 1..118"),
    ],
)
def test_bad_records_raise_one_clear_error(tmp_path, overrides, message):
    path = _store_with(tmp_path, **overrides)
    with pytest.raises(DataError, match=rf"data.lmdb, record 0: {message}"):
        S2EFDataset(path)[0]


def test_missing_required_key(tmp_path):
    path = _store_with(tmp_path, forces=None)
    record = slab_record(0)
    del record["forces"]
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", store.encode(record))
    env.close()
    with pytest.raises(DataError, match=r"record 0: missing required field\(s\) \['forces'\]"):
        S2EFDataset(path)[0]


def test_no_neighbour_inside_cutoff_gives_an_empty_graph(s2ef_path):
    # once refused; structures without neighbours are valid everywhere (tests/data/test_bad_structures.py)
    record = S2EFDataset(s2ef_path, transforms=[RadiusGraph(cutoff=0.5)])[7]
    assert record["edge_index"].shape == (2, 0)


def test_truncated_lmdb_is_reported_not_crashed(tmp_path):
    path = write_dataset(tmp_path / "ds", 6) / "data.lmdb"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(DataError, match=r"data.lmdb: (LMDB file is truncated|cannot open as LMDB)"):
        LMDBDataset(path)


def test_garbage_file_is_not_an_lmdb(tmp_path):
    path = tmp_path / "data.lmdb"
    path.write_bytes(os.urandom(20000))
    with pytest.raises(DataError, match=r"data.lmdb: cannot open as LMDB"):
        LMDBDataset(path)


def test_corrupt_record_value(tmp_path):
    path = _store_with(tmp_path)
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        value = txn.get(b"0")
        txn.put(b"0", value[: len(value) // 2])
    env.close()
    # the CRC-32 (codec v2) catches the cut before the header is parsed
    with pytest.raises(DataError, match=r"data.lmdb, record 0: checksum mismatch"):
        LMDBDataset(path)[0]


def test_empty_dataset_and_missing_paths(tmp_path):
    empty = _write_raw(tmp_path / "empty.lmdb", {})
    with pytest.raises(DataError, match=r"empty.lmdb: dataset holds no records"):
        LMDBDataset(empty)
    with pytest.raises(DataError, match="no such dataset file or directory"):
        LMDBDataset(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="directory holds no .lmdb files"):
        LMDBDataset(tmp_path / "emptydir")


def test_writer_refuses_to_create_an_empty_dataset_and_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="no records were written"):
        with store.DatasetWriter(tmp_path / "out", task="s2ef"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_failure_leaves_no_dataset(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with store.DatasetWriter(tmp_path / "out", task="s2ef", records_per_shard=2) as writer:
            for i in range(5):
                writer.add(slab_record(i))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_validates_every_record_and_names_its_source(tmp_path):
    record = slab_record(0)
    record["positions"] = record["positions"].copy()
    record["positions"][3, 1] = np.nan
    with pytest.raises(DataError, match=r"input.xyz, record 7: positions holds NaN or inf"):
        with store.DatasetWriter(tmp_path / "out", task="s2ef") as writer:
            writer.add(slab_record(1))
            writer.add(record, source="input.xyz", index=7)
    assert list(tmp_path.iterdir()) == []


def test_degenerate_periodic_cell_is_refused(tmp_path):
    record = slab_record(0)
    record["cell"] = record["cell"].copy()
    record["cell"][2] = record["cell"][0]
    with pytest.raises(DataError, match="cell is degenerate along a periodic direction"):
        store.DatasetWriter(tmp_path / "out", task="s2ef").add(record)


def test_a_replaced_dataset_is_read_afresh_in_the_same_process(tmp_path):
    # the reader cache is keyed by inode; a new file may reuse a deleted file's inode number
    path = write_dataset(tmp_path / "ds", 3)
    assert [int(LMDBDataset(path)[i]["sid"]) for i in range(3)] == [0, 1, 2]
    with store.DatasetWriter(path, task="s2ef", overwrite=True) as writer:
        for seed in (7, 8):
            writer.add(slab_record(seed))
    dataset = LMDBDataset(path)
    assert len(dataset) == 2 and [int(dataset[i]["sid"]) for i in range(2)] == [7, 8]
    lmdb_shards.reader(lmdb_shards.shard_paths(path)[0])  # the shared environment stays usable
    assert int(LMDBDataset(path)[1]["sid"]) == 8


def test_card_statistics_leave_out_fixed_atoms_and_give_the_composition_fit():
    import numpy as np

    from matsciml.data.composition import fit_references, residual_moments
    from matsciml.data.formats.card import COMPOSITION, DatasetStatistics

    rng = np.random.default_rng(0)
    truth, stats, rows = {1: -3.0, 8: -5.0, 29: -4.0}, DatasetStatistics("s2ef"), []
    for _ in range(30):
        numbers = rng.choice([1, 8, 29], size=int(rng.integers(3, 9)))
        energy = sum(truth[int(z)] for z in numbers) + rng.normal(0, 0.01)
        fixed = np.zeros(len(numbers), dtype=bool)
        fixed[0] = True
        forces = rng.normal(size=(len(numbers), 3))
        forces[0] = 100.0  # a fixed atom's force must not reach the statistics
        stats.add(
            {
                "natoms": np.int64(len(numbers)),
                "atomic_numbers": numbers,
                "energy": np.float64(energy),
                "forces": forces,
                "fixed": fixed,
            }
        )
        rows.append((numbers, energy))
    summary = stats.summary()["statistics"]
    assert summary["forces"]["free_atoms_only"] and summary["forces"]["components"]["max"] < 100.0
    fitted = fit_references(summary[COMPOSITION])
    residual = residual_moments(summary[COMPOSITION]["per_atom"], fitted)
    # the fit plus its shift reproduces the true references; the residual is the added noise
    for z, ref in truth.items():
        assert fitted[z] + residual["mean"] == pytest.approx(ref, abs=0.01)
    assert residual["std"] < 0.01


def test_reference_fit_of_one_composition_is_zero_not_rounding_noise():
    """Every record Cu48Pd16Au16 (the MD devset, DFT MD of one compound): the centred equations
    are zero up to rounding, and the fit must not turn that rounding into references of an eV."""
    import numpy as np

    from matsciml.data.composition import fit_references
    from matsciml.data.formats.card import COMPOSITION, DatasetStatistics

    rng = np.random.default_rng(0)
    numbers = np.array([29] * 48 + [46] * 16 + [79] * 16)
    stats = DatasetStatistics("s2ef")
    for _ in range(130):
        energy = 32.0 + rng.normal(0, 1.0)
        forces = rng.normal(size=(80, 3))
        record = {"natoms": np.int64(80), "atomic_numbers": rng.permutation(numbers), "energy": np.float64(energy)}
        stats.add({**record, "forces": forces, "fixed": np.zeros(80, dtype=bool)})
    fitted = fit_references(stats.summary()["statistics"][COMPOSITION])
    assert max(abs(value) for value in fitted.values()) < 1e-6, fitted
