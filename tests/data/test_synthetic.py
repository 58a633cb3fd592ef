"""Synthetic OC20-sized datasets: counts, layout, consistent pair-potential labels, seeding."""

import numpy as np
import pytest
from helpers.emt import read_split, vacuum_gap

from matsciml.cli.app import main
from matsciml.data.synthetic import adsorption_energy, pair_energy_forces, synthetic_record, write_synthetic


@pytest.fixture(scope="module")
def s2ef(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "s2ef"
    card = write_synthetic(path, num_structures=50, records_per_shard=20, seed=3, progress=False)
    return path, card, *read_split(path)


def test_writes_the_requested_records_in_shards(s2ef):
    path, card, records, cards = s2ef
    assert sorted(p.name for p in path.iterdir()) == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]
    assert [c["shard"]["count"] for c in cards] == [20, 20, 10]
    assert card["num_records"] == len(records) == 50 and card["num_shards"] == 3
    assert card["num_atoms"] == sum(len(r["positions"]) for r in records)
    assert card["statistics"]["energy"]["count"] == 50
    assert [int(r["sid"]) for r in records] == list(range(50))


def test_structures_are_oc20_sized_slabs_with_adsorbates(s2ef):
    records = s2ef[2]
    sizes = [len(r["positions"]) for r in records]
    assert 40 <= min(sizes) and max(sizes) <= 120 and len(set(sizes)) > 5
    for record in records:
        tags, fixed, z = record["tags"], record["fixed"], record["positions"][:, 2]
        ads = tags == 2
        assert 1 <= ads.sum() <= 4 and set(record["atomic_numbers"][ads].tolist()) <= {1, 6, 7, 8}
        assert not fixed[ads].any() and fixed.any()
        assert z[fixed].max() < z[~fixed & ~ads].min() and z[tags == 0].max() < z[tags == 1].min()
        assert record["pbc"].all() and vacuum_gap(record) > 6.0


def test_stored_forces_are_minus_the_energy_gradient(s2ef):
    records = s2ef[2]
    for record in records[:10]:
        positions = record["positions"].astype(np.float64)
        cell = record["cell"].astype(np.float64)
        energy, forces = pair_energy_forces(positions, record["atomic_numbers"], cell)
        np.testing.assert_allclose(record["energy"], energy, rtol=1e-6)
        np.testing.assert_allclose(record["forces"], forces, atol=1e-5)
    record = records[0]
    positions, cell, numbers = (
        record["positions"].astype(np.float64),
        record["cell"].astype(np.float64),
        record["atomic_numbers"],
    )
    step, numeric = 1e-5, np.zeros_like(positions)
    for atom in range(len(positions)):
        for axis in range(3):
            shifted = positions.copy()
            shifted[atom, axis] += step
            plus = pair_energy_forces(shifted, numbers, cell)[0]
            shifted[atom, axis] -= 2 * step
            numeric[atom, axis] = -(plus - pair_energy_forces(shifted, numbers, cell)[0]) / (2 * step)
    np.testing.assert_allclose(pair_energy_forces(positions, numbers, cell)[1], numeric, atol=1e-6)
    assert np.abs(numeric).max() > 0.1  # a non-trivial check


def test_periodic_images_and_translation_are_handled():
    record = synthetic_record(np.random.default_rng(0))
    positions, cell, numbers = (
        record["positions"].astype(np.float64),
        record["cell"].astype(np.float64),
        record["atomic_numbers"],
    )
    energy, forces = pair_energy_forces(positions, numbers, cell)
    shifted = positions + [cell[0, 0] / 3, cell[1, 1] / 2, 0.0]  # atoms cross the cell boundary
    shifted[:, :2] %= np.diag(cell)[:2]
    moved_energy, moved_forces = pair_energy_forces(shifted, numbers, cell)
    np.testing.assert_allclose(moved_energy, energy, rtol=1e-10)
    np.testing.assert_allclose(moved_forces, forces, atol=1e-10)
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-10)  # Newton's third law


def test_same_seed_same_data(tmp_path, s2ef):
    card = s2ef[1]
    again = write_synthetic(tmp_path / "again", num_structures=50, records_per_shard=20, seed=3, progress=False)
    other = write_synthetic(tmp_path / "other", num_structures=50, records_per_shard=20, seed=4, progress=False)
    assert again["content_hash"] == card["content_hash"] != other["content_hash"]


def test_is2re_relaxation_lowers_the_energy(tmp_path):
    card = write_synthetic(tmp_path / "is2re", 12, task="is2re", records_per_shard=None, progress=False)
    records, _ = read_split(tmp_path / "is2re")
    assert card["num_records"] == 12 and [p.name for p in (tmp_path / "is2re").iterdir()] == ["data.lmdb"]
    for record in records:
        numbers, cell, ads = record["atomic_numbers"], record["cell"].astype(np.float64), record["tags"] == 2
        initial, relaxed = record["positions"].astype(np.float64), record["relaxed_positions"].astype(np.float64)
        assert pair_energy_forces(relaxed, numbers, cell)[0] < pair_energy_forces(initial, numbers, cell)[0]
        np.testing.assert_allclose(record["initial_energy"], adsorption_energy(initial, numbers, cell, ads), rtol=1e-6)
        np.testing.assert_allclose(record["relaxed_energy"], adsorption_energy(relaxed, numbers, cell, ads), rtol=1e-6)
        np.testing.assert_array_equal(relaxed[record["fixed"]], initial[record["fixed"]])


def test_command_line(tmp_path):
    assert main(["devset", "synthetic", str(tmp_path / "cli"), "--num", "7", "--records-per-shard", "5"]) == 0
    records, cards = read_split(tmp_path / "cli")
    assert len(records) == 7 and len(cards) == 2
    assert main(["devset", "synthetic", str(tmp_path / "cli"), "--num", "7"]) == 2  # exists: refused


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        write_synthetic("unused", 5, task="s2e")
    with pytest.raises(ValueError, match="num_structures"):
        write_synthetic("unused", 0)
