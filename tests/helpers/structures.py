"""Small EMT-labelled slab records for tests, written in the test session (no golden files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from matsciml.data.formats.store import DatasetWriter
from matsciml.data.records import validate_record


def slab_atoms(seed: int, metal: str = "Cu", adsorbate: str = "O"):
    """A rattled 2x2x3 fcc(111) slab with one adsorbate, EMT-labelled, OC20 tags and fixed atoms."""
    atoms = fcc111(metal, size=(2, 2, 3), vacuum=7.0)
    add_adsorbate(atoms, adsorbate, height=1.8, position="fcc")
    atoms.pbc = True
    tags = atoms.get_tags()  # ASE: layer number from the top (1) down; adsorbate 0
    oc20_tags = np.where(tags == 0, 2, np.where(tags == 1, 1, 0))
    atoms.set_tags(oc20_tags)
    atoms.set_constraint(FixAtoms(mask=tags == 3))
    atoms.rattle(stdev=0.05, seed=seed)
    atoms.calc = EMT()
    return atoms


def slab_record(seed: int, sid: int | None = None, task: str = "s2ef", **kwargs) -> dict:
    atoms = slab_atoms(seed, **kwargs)
    record = {
        "positions": atoms.positions,
        "atomic_numbers": atoms.numbers,
        "cell": atoms.cell.array,
        "pbc": atoms.pbc,
        "tags": atoms.get_tags(),
        "fixed": np.isin(np.arange(len(atoms)), atoms.constraints[0].index),
        "sid": seed if sid is None else sid,
        "fid": 0,
    }
    energy = atoms.get_potential_energy()
    if task == "s2ef":
        record.update(energy=energy, forces=atoms.get_forces())
    else:
        record.update(relaxed_energy=energy - 100.0, relaxed_positions=atoms.positions + 0.01)
    return validate_record(record, "<test>", seed, task=task)


def write_dataset(path: Path, num: int, task: str = "s2ef", records_per_shard: int | None = None) -> Path:
    metals = ("Cu", "Pt", "Ag", "Au")
    with DatasetWriter(path, task=task, records_per_shard=records_per_shard, source="tests") as writer:
        for i in range(num):
            writer.add(slab_record(i, task=task, metal=metals[i % len(metals)]))
    return path
