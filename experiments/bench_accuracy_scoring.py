"""Data and scoring of experiments/bench_accuracy.py: the splits as records and extxyz, errors, baselines.

Errors are scored the same way for every model, from its predictions for the test split: the MAE
of the energy per atom (``mean_s |E_pred - E_ref| / N_s``, meV/atom) and of the free atoms' force
components (meV/Å; records' ``fixed`` atoms are left out, as in our tasks' metrics).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.data import chemical_symbols

SPLITS = ("train", "val", "test")


def read_split(path: Path) -> list[dict]:
    """Every record of an S2EF split, read with matsciml's reader (validated)."""
    from matsciml.data.datasets import S2EFDataset

    dataset = S2EFDataset(path)
    return [dataset.read(i) for i in range(len(dataset))]


def to_atoms(record: dict) -> Atoms:
    """An ``Atoms`` with the record's energy and forces as stored results and its fixed atoms."""
    atoms = Atoms(
        numbers=record["atomic_numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"]
    )
    if "fixed" in record and record["fixed"].any():
        atoms.set_constraint(FixAtoms(mask=record["fixed"].astype(bool)))
    atoms.calc = SinglePointCalculator(atoms, energy=float(record["energy"]), forces=record["forces"])
    return atoms


def write_extxyz(records: list[dict], path: Path) -> None:
    """The records as one extended XYZ file (written to a temporary name, then renamed)."""
    partial = path.with_suffix(".partial.xyz")
    ase.io.write(partial, [to_atoms(r) for r in records], format="extxyz")
    partial.rename(path)


def free_mask(records: list[dict]) -> np.ndarray:
    """``(sum N,)`` True for the atoms whose forces are scored."""
    return np.concatenate(
        [~r["fixed"].astype(bool) if "fixed" in r else np.ones(len(r["forces"]), bool) for r in records]
    )


def errors(energy: np.ndarray, forces: np.ndarray, records: list[dict]) -> dict[str, float]:
    """Energy-per-atom MAE (meV/atom) and free-atom force MAE (meV/Å) of predictions for ``records``.

    Shapes:
        energy: ``(S,)`` eV, one per record; forces: ``(sum N, 3)`` eV/Å, records concatenated in order.
    """
    natoms = np.array([len(r["forces"]) for r in records], dtype=np.float64)
    target_energy = np.array([float(r["energy"]) for r in records])
    target_forces = np.concatenate([r["forces"] for r in records]).astype(np.float64)
    if energy.shape != target_energy.shape or forces.shape != target_forces.shape:
        raise ValueError(f"predictions {energy.shape}, {forces.shape} do not match the test split's")
    free = free_mask(records)
    return {
        "energy_mae_mev_per_atom": 1000 * float(np.mean(np.abs(energy - target_energy) / natoms)),
        "force_mae_mev_per_a": 1000 * float(np.mean(np.abs(forces[free] - target_forces[free]))),
        # every atom, as nequip's own test metric counts them (a cross-check; not in the table)
        "force_mae_all_atoms_mev_per_a": 1000 * float(np.mean(np.abs(forces - target_forces))),
    }


def composition(records: list[dict], elements: list[int]) -> np.ndarray:
    """``(S, 1 + len(elements))``: a constant and each element's fraction of the structure's atoms."""
    fractions = [
        np.bincount(r["atomic_numbers"], minlength=max(elements) + 1)[elements] / len(r["forces"]) for r in records
    ]
    return np.column_stack([np.ones(len(records)), np.array(fractions)])


def baselines(train: list[dict], test: list[dict]) -> dict[str, dict[str, float]]:
    """Errors of structure-blind predictions: energies per atom without a model, zero forces.

    ``mean energy``: the training mean energy per atom for every atom. ``composition fit``: the
    least-squares energy per atom from the element fractions (minimum norm; what our tasks'
    ``element_references: fit`` start from), shown because total energies here grow with composition.
    """
    natoms = np.array([len(r["forces"]) for r in test], dtype=np.float64)
    zeros = np.zeros((int(natoms.sum()), 3))
    per_atom = np.array([float(r["energy"]) / len(r["forces"]) for r in train])
    elements = sorted({int(z) for r in train + test for z in r["atomic_numbers"]})
    coefficients = np.linalg.lstsq(composition(train, elements), per_atom, rcond=None)[0]
    mean = errors(per_atom.mean() * natoms, zeros, test)
    fit = errors(composition(test, elements) @ coefficients * natoms, zeros, test)
    return {
        "mean energy": {"energy_mae_mev_per_atom": mean["energy_mae_mev_per_atom"]},
        "composition fit": {"energy_mae_mev_per_atom": fit["energy_mae_mev_per_atom"]},
        "zero forces": {k: v for k, v in mean.items() if k.startswith("force")},
    }


def prepare(data: Path, work: Path) -> tuple[dict[str, list[dict]], dict[str, str], list[str]]:
    """Records of each split, their extxyz files (for nequip) and the element symbols of all splits."""
    records = {split: read_split(data / split) for split in SPLITS}
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLITS:
        files[split] = str((work / f"{split}.xyz").resolve())
        write_extxyz(records[split], Path(files[split]))
    numbers = sorted({int(z) for rs in records.values() for r in rs for z in r["atomic_numbers"]})
    return records, files, [chemical_symbols[z] for z in numbers]
