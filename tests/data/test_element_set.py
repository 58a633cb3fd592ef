"""`matsciml devset build --metals`: a small EMT set with an element the S2EF devset trains without."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.emt import atoms_from, emt_energy_forces, read_split

from matsciml.cli.app import main
from matsciml.data.element_set import build_element_set, split_sizes
from matsciml.data.fingerprint import dataset_digest

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")
AL, ADSORBATE_ELEMENTS = 13, {1, 6, 7, 8}


def elements(path: Path) -> set[int]:
    return {int(z) for record in read_split(path)[0] for z in record["atomic_numbers"]}


@pytest.fixture(scope="module")
def al_set(tmp_path_factory):
    """15 Al frames (three systems) through the CLI, one worker."""
    out = tmp_path_factory.mktemp("sets") / "al"
    assert main(["devset", "build", "--metals", "Al", "--structures", "15", "--out", str(out), "--workers", "1"]) == 0
    return out


def test_the_devset_trains_without_al():
    assert AL not in elements(ROOT / "devsets/s2ef/train")  # the premise: Al is new to a devset-trained model


def test_the_set_has_al_slabs_in_three_splits_with_a_record(al_set):
    sizes = split_sizes(15)
    assert sizes == {"train": 9, "val": 3, "test": 3}
    for split in SPLITS:
        records, cards = read_split(al_set / split)
        assert len(records) == sizes[split] == cards[0]["num_records"] and cards[0]["task"] == "s2ef"
        for record in records:
            slab = record["tags"] != 2
            assert set(record["atomic_numbers"][slab].tolist()) == {AL}
            assert set(record["atomic_numbers"][~slab].tolist()) <= ADSORBATE_ELEMENTS
            energy, forces = emt_energy_forces(atoms_from(record))  # labels are EMT's at the stored positions
            np.testing.assert_allclose(record["forces"], forces, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(record["energy"], energy, rtol=1e-6, atol=1e-5)
    sids = [{int(r["sid"]) for r in read_split(al_set / split)[0]} for split in SPLITS]
    assert sum(map(len, sids)) == len(set().union(*sids))  # splits share no system
    record = json.loads(al_set.with_name("al.step.json").read_text())
    assert record["status"] == "COMPLETED" and record["step"] == "devset build"
    outputs = {o["role"]: o["digest"] for o in record["outputs"]}
    assert outputs == {f"dataset:{split}": dataset_digest(al_set / split) for split in SPLITS}


def test_the_same_seed_gives_the_same_set_for_any_worker_count(al_set, tmp_path):
    build_element_set(tmp_path / "again", ["Al"], 15, seed=0, workers=2, progress=False)
    build_element_set(tmp_path / "other", ["Al"], 15, seed=1, workers=1, progress=False)
    for split in SPLITS:
        assert dataset_digest(tmp_path / "again" / split) == dataset_digest(al_set / split)
        assert dataset_digest(tmp_path / "other" / split) != dataset_digest(al_set / split)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metals", "Fe", "--out", "{tmp}/fe"], "--metals Fe: choose one or more of Cu, Ag, Au, Ni, Pd, Pt, Al"),
        (["--metals", "Al"], "--metals needs --out"),
        (["--metals", "Al", "--structures", "2", "--out", "{tmp}/al"], "at least 3"),
        (["--structures", "20", "--out", "{tmp}/dev"], "--structures sets the size of a --metals set"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    assert main(["devset", "build", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_set_is_refused_before_any_work(al_set):
    with pytest.raises(FileExistsError, match="overwrite"):
        build_element_set(al_set, ["Al"], 15, progress=False)
