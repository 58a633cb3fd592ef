"""The EMT devset builder: deterministic, OC20 semantics, labels that EMT reproduces."""

import numpy as np
import pytest
from ase.data import chemical_symbols
from helpers.emt import atoms_from, emt_energy_forces, gas_references, read_split, vacuum_gap

from matsciml.data.devset_builder import build_devsets
from matsciml.data.devsets import DEVSET_SPLITS

# Two S2EF systems in train (three shards of 4), one in val and test; four IS2RE systems.
TINY = {"s2ef": {"train": 12, "val": 3, "test": 3}, "is2re": {"train": 2, "val": 1, "test": 1}}
ADSORBATE_ELEMENTS = {1, 6, 7, 8}
METALS = {13, 28, 29, 46, 47, 78, 79}


def _build(root, seed=0, workers=1):
    build_devsets(root, seed=seed, sizes=TINY, workers=workers, progress=False)
    return {(task, split): read_split(root / task / split) for task in TINY for split in DEVSET_SPLITS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("devsets")
    return root, _build(root)


def _hashes(built):
    return {key: cards[0]["content_hash"] for key, (_, cards) in built.items()}


def test_layout_and_counts(tiny):
    root, built = tiny
    assert sorted(p.name for p in (root / "s2ef" / "train").iterdir()) == [
        "data.0000.lmdb",
        "data.0001.lmdb",
        "data.0002.lmdb",
    ]
    assert [p.name for p in (root / "is2re" / "val").iterdir()] == ["data.lmdb"]
    for (task, split), (records, cards) in built.items():
        assert len(records) == TINY[task][split] == cards[0]["num_records"]
        assert cards[0]["task"] == task and "EMT" in cards[0]["source"]


def test_same_seed_gives_identical_data_for_any_worker_count(tiny, tmp_path):
    _, built = tiny
    again = _build(tmp_path / "again", workers=2)
    assert _hashes(again) == _hashes(built)


def test_another_seed_gives_other_data(tiny, tmp_path):
    _, built = tiny
    other = _hashes(_build(tmp_path / "other", seed=1, workers=2))
    assert all(other[key] != digest for key, digest in _hashes(built).items())


def test_tags_fixed_atoms_and_vacuum_follow_oc20(tiny):
    _, built = tiny
    for (task, _), (records, _) in built.items():
        for record in records:
            tags, fixed, numbers = record["tags"], record["fixed"], record["atomic_numbers"]
            ads = tags == 2
            assert set(numbers[ads].tolist()) <= ADSORBATE_ELEMENTS and set(numbers[~ads].tolist()) <= METALS
            assert ads.any() and fixed.any() and not fixed[ads].any()
            assert ((tags == 1) & ~fixed).any()
            if task == "is2re" or record["fid"] == 0:  # before MD scrambles the layers a little
                z = record["positions"][:, 2]
                assert z[fixed].max() < z[~fixed & ~ads].min()  # fixed atoms are the bottom layers
                assert z[tags == 0].max() < z[tags == 1].min()  # tag 1 is the top layer
            keys = ["positions"] + (["relaxed_positions"] if task == "is2re" else [])
            assert all(vacuum_gap(record, key) > 6.0 for key in keys)  # a 6 Å graph misses the z image


def test_s2ef_labels_are_emt_at_the_stored_positions(tiny):
    _, built = tiny
    for split in DEVSET_SPLITS:
        for record in built["s2ef", split][0]:
            energy, forces = emt_energy_forces(atoms_from(record))
            # labels were computed on the float32 positions: only their own float32 rounding remains
            np.testing.assert_allclose(record["energy"], energy, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(record["forces"], forces, rtol=1e-5, atol=1e-5)


def test_s2ef_frames_come_from_one_trajectory_per_system(tiny):
    _, built = tiny
    records = built["s2ef", "train"][0]
    by_sid = {}
    for record in records:
        by_sid.setdefault(int(record["sid"]), []).append(record)
    assert len(by_sid) == 2
    for frames in by_sid.values():
        fids = [int(f["fid"]) for f in frames]
        assert fids == sorted(set(fids))
        assert all(np.array_equal(f["atomic_numbers"], frames[0]["atomic_numbers"]) for f in frames)
        fixed = frames[0]["fixed"]
        assert all(np.array_equal(f["positions"][fixed], frames[0]["positions"][fixed]) for f in frames)
        assert len({float(f["energy"]) for f in frames}) == len(frames)


def test_is2re_energies_are_adsorption_energies(tiny):
    _, built = tiny
    references = gas_references()
    for split in DEVSET_SPLITS:
        for record in built["is2re", split][0]:
            ads = record["tags"] == 2
            slab_energy, _ = emt_energy_forces(atoms_from(record, mask=~ads))
            offset = slab_energy + sum(references[chemical_symbols[z]] for z in record["atomic_numbers"][ads])
            relaxed, forces = emt_energy_forces(atoms_from(record, "relaxed_positions"))
            initial, _ = emt_energy_forces(atoms_from(record))
            np.testing.assert_allclose(record["relaxed_energy"], relaxed - offset, atol=1e-4)
            np.testing.assert_allclose(record["initial_energy"], initial - offset, atol=1e-4)
            assert record["relaxed_energy"] <= record["initial_energy"] + 1e-4
            assert np.abs(forces[~record["fixed"]]).max() < 0.1  # relaxed (fmax 0.05), within a step
            fixed = record["fixed"]
            np.testing.assert_array_equal(record["relaxed_positions"][fixed], record["positions"][fixed])


def test_splits_share_no_system(tiny):
    _, built = tiny
    for task in TINY:
        sids = [{int(r["sid"]) for r in built[task, split][0]} for split in DEVSET_SPLITS]
        assert sum(map(len, sids)) == len(set().union(*sids))


def test_existing_output_is_refused_before_any_work(tiny):
    root, _ = tiny
    with pytest.raises(FileExistsError, match="overwrite"):
        build_devsets(root, sizes=TINY, progress=False)


@pytest.mark.parametrize(
    "sizes, match",
    [
        ({"s2ef": {"train": 0}}, "positive integer"),
        ({"s2ef": {"training": 5}}, "unknown entries"),
        ({"is2rs": {"train": 5}}, "unknown entries"),
    ],
)
def test_bad_sizes_are_rejected(tmp_path, sizes, match):
    with pytest.raises(ValueError, match=match):
        build_devsets(tmp_path / "out", sizes=sizes, progress=False)
    assert not (tmp_path / "out").exists()
