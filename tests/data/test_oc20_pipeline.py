"""Legacy OC20 LMDBs go through the whole pipeline: dataset, graphs, DataModule, info.

The files are hand-built in the OCP layout (old PyG 1.x pickles, sharded, `length` key)
while PyG is not installed.
"""

import importlib.util

import numpy as np
import pytest
import torch
from helpers.oc20 import is2re_record, s2ef_record, write_oc20_lmdb, write_oc20_shards
from rich.console import Console

from matsciml.data import IS2REDataModule, S2EFDataModule
from matsciml.data.info import describe


@pytest.fixture
def oc20_s2ef(tmp_path):
    shards = [[s2ef_record(natoms=6, sid=s, fid=f, seed=10 * s + f) for f in range(3)] for s in range(2)]
    write_oc20_shards(tmp_path / "s2ef", shards, style="pyg1")
    return tmp_path / "s2ef", [r for shard in shards for r in shard]


def test_pyg_is_not_installed_here():
    assert importlib.util.find_spec("torch_geometric") is None


def test_old_pyg_s2ef_directory_trains_through_the_datamodule(oc20_s2ef):
    path, records = oc20_s2ef
    dm = S2EFDataModule(train_path=path, batch_size=6, shuffle=False, cutoff=6.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_structures == 6 and batch.num_edges > 0
    expected = np.concatenate([r["pos"].numpy() for r in records])
    assert np.array_equal(batch.positions.numpy(), expected)
    assert np.allclose(batch.energy.numpy(), [r["y"] for r in records])
    assert np.array_equal(batch.forces.numpy(), np.concatenate([r["force"].numpy() for r in records]))
    assert batch.atomic_numbers.dtype == torch.int64  # stored as float32 in old files
    assert batch.fixed.dtype == torch.bool and int(batch.fixed.sum()) == 6 * 3
    assert batch.sid.tolist() == [0, 0, 0, 1, 1, 1] and batch.fid.tolist() == [0, 1, 2] * 2


def test_is2re_single_file_without_length_key(tmp_path):
    records = [is2re_record(natoms=5, sid=s, seed=s) for s in range(4)]
    path = write_oc20_lmdb(tmp_path / "data.lmdb", records, style="pyg2", length_key=False)
    dm = IS2REDataModule(train_path=path, batch_size=4, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert np.allclose(batch.relaxed_energy.numpy(), [r["y_relaxed"] for r in records])
    assert np.allclose(batch.initial_energy.numpy(), [r["y_init"] for r in records])
    assert np.allclose(batch.relaxed_positions.numpy(), np.concatenate([r["pos_relaxed"].numpy() for r in records]))


def test_info_summarises_legacy_files(oc20_s2ef):
    path, _ = oc20_s2ef
    console = Console(record=True, width=150)
    card = describe(path, console=console)
    assert card["format"] == "oc20-pickle" and card["task"] == "s2ef" and card["num_records"] == 6
    assert "oc20-pickle, 2 shard(s)" in console.export_text()
