"""The shipped devsets (``matsciml.devsets``): present, complete, valid, and still EMT's labels."""

import numpy as np
import pytest
from helpers.emt import atoms_from, emt_energy_forces, read_split, vacuum_gap

from matsciml.data.devsets import DEVSET_SPLITS, DEVSET_TASKS, devset_path
from matsciml.data.records import validate_record

METALS = {13, 28, 29, 46, 47, 78, 79}
SPLITS = [(task, split) for task in DEVSET_TASKS for split in DEVSET_SPLITS]


@pytest.fixture(scope="module")
def devsets():
    """Every split, read once: (records, shard cards) by (task, split)."""
    return {key: read_split(devset_path(*key)) for key in SPLITS}


@pytest.mark.parametrize("task, split", SPLITS)
def test_every_record_is_there_and_valid(devsets, task, split):
    records, cards = devsets[task, split]
    card = cards[0]
    assert card["task"] == task and card["num_shards"] == len(cards)
    assert len(records) == card["num_records"] == sum(c["shard"]["count"] for c in cards) >= 50
    assert card["num_atoms"] == sum(len(r["positions"]) for r in records)
    for index, record in enumerate(records):
        checked = validate_record(record, devset_path(task, split), index, task=task)
        assert set(record) <= set(checked)  # nothing stored that the contract does not know
        assert vacuum_gap(record) > 6.0


def test_layout_follows_oc20(devsets):
    assert len(devsets["s2ef", "train"][1]) >= 2  # sharded data.NNNN.lmdb
    assert [p.name for p in devset_path("is2re", "val").iterdir() if p.suffix == ".lmdb"] == ["data.lmdb"]


@pytest.mark.parametrize("task", DEVSET_TASKS)
def test_chemistry_and_splits(devsets, task):
    elements, sids = set(), []
    for split in DEVSET_SPLITS:
        records = devsets[task, split][0]
        elements |= {int(z) for r in records for z in r["atomic_numbers"]}
        sids.append({int(r["sid"]) for r in records})
        for record in records:
            ads = record["tags"] == 2
            assert ads.any() and not record["fixed"][ads].any()
    assert len(elements & METALS) >= 5 and {1, 6, 7, 8} <= elements
    assert sum(map(len, sids)) == len(set().union(*sids))  # no system in two splits


def test_s2ef_labels_are_still_what_emt_computes(devsets):
    records = devsets["s2ef", "val"][0]
    for record in records[::20]:
        energy, forces = emt_energy_forces(atoms_from(record))
        np.testing.assert_allclose(record["energy"], energy, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(record["forces"], forces, rtol=1e-5, atol=1e-5)


def test_is2re_targets_are_adsorption_energies(devsets):
    records = devsets["is2re", "train"][0]
    energies = np.array([r["relaxed_energy"] for r in records])
    assert -4.0 < energies.min() and energies.max() < 1.0 and energies.std() > 0.1
    assert all(r["relaxed_energy"] <= r["initial_energy"] + 1e-4 for r in records)
