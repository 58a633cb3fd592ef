"""Read matsciml datasets record by record and recompute EMT labels, independently of the builder.

Used by the devset tests: nothing here imports :mod:`matsciml.data.devset_builder` or
:mod:`matsciml.data.emt_systems`, so the checks do not share the code they check.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from matsciml.data.formats.lmdb_shards import reader, record_key, shard_paths
from matsciml.data.formats.store import decode, read_metadata, read_natoms


def read_split(path: Path) -> tuple[list[dict], list[dict]]:
    """All records of a dataset in shard order, and each shard's metadata card.

    Also checks what the format promises per shard: the ``natoms`` index matches the
    records, and the card's ``content_hash`` is the sha256 of every key and value in order.
    """
    records, cards, digest = [], [], hashlib.sha256()
    for shard in shard_paths(path):
        env = reader(shard)  # shared per process: not ours to close
        card = read_metadata(env, shard)
        assert card is not None, f"{shard} has no matsciml metadata"
        with env.begin() as txn:
            for index in range(card["shard"]["count"]):
                value = txn.get(record_key(index))
                assert value is not None, f"{shard} lacks record {index}"
                digest.update(record_key(index) + value)
                records.append(decode(value, shard, index))
            assert txn.get(record_key(card["shard"]["count"])) is None, f"{shard} holds extra records"
        natoms = read_natoms(env, shard)
        shard_records = records[len(records) - card["shard"]["count"] :]
        assert natoms.tolist() == [len(r["positions"]) for r in shard_records]
        cards.append(card)
    assert all(card["content_hash"] == "sha256:" + digest.hexdigest() for card in cards)
    return records, cards


def atoms_from(record: dict, positions_key: str = "positions", mask: np.ndarray | None = None) -> Atoms:
    """An ``Atoms`` built from a stored record (float32 values promoted to float64)."""
    mask = np.ones(len(record["positions"]), dtype=bool) if mask is None else mask
    return Atoms(
        numbers=record["atomic_numbers"][mask],
        positions=record[positions_key][mask].astype(np.float64),
        cell=record["cell"].astype(np.float64),
        pbc=record["pbc"],
    )


def emt_energy_forces(atoms: Atoms) -> tuple[float, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = EMT()
    return float(atoms.get_potential_energy()), atoms.get_forces()


def emt_molecule_energy(symbols: str, bond: float) -> float:
    """EMT energy of a diatomic molecule relaxed alone (ASE BFGS, fmax 1e-4 eV/Å)."""
    molecule = Atoms(symbols, positions=[(0, 0, 0), (0, 0, bond)], cell=[12, 12, 12], pbc=False)
    molecule.calc = EMT()
    BFGS(molecule, logfile=None).run(fmax=1e-4, steps=500)
    return float(molecule.get_potential_energy())


def gas_references() -> dict[str, float]:
    """The per-atom references the devset builder documents: H2/2, O2/2, N2/2, CO - O2/2."""
    h2, o2 = emt_molecule_energy("HH", 0.74), emt_molecule_energy("OO", 1.21)
    n2, co = emt_molecule_energy("NN", 1.10), emt_molecule_energy("CO", 1.13)
    return {"H": h2 / 2, "O": o2 / 2, "N": n2 / 2, "C": co - o2 / 2}


def vacuum_gap(record: dict, positions_key: str = "positions") -> float:
    """Empty space (Å) along z between the structure and its periodic image (orthogonal z axis)."""
    z = record[positions_key][:, 2].astype(np.float64)
    return float(record["cell"][2, 2] - (z.max() - z.min()))
