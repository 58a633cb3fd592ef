"""EMT-labelled slabs written in every input format ``matsciml data convert`` reads.

All data is generated in the test session (ASE's EMT calculator); nothing is a golden file.
"""

from __future__ import annotations

from pathlib import Path

import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from matsciml.data.formats import lmdb_shards
from matsciml.data.formats.store import decode, read_metadata


def emt_frames(num: int, seed: int = 0, labels: bool = True) -> list[Atoms]:
    """``num`` rattled Cu(111) 2x2x3 + O slabs: OC20 tags, bottom layer fixed, EMT single points.

    Each frame gets ``info["relaxed_energy"]`` (energy - 1 eV) and a ``relaxed_positions``
    array (positions + 0.01 Å) so the same frames serve IS2RE tests.
    """
    frames = []
    for i in range(num):
        atoms = fcc111("Cu", (2, 2, 3), vacuum=6.0)
        add_adsorbate(atoms, "O", 1.5, "fcc")
        del atoms.info["adsorbate_info"]  # a dict that extxyz cannot write
        layer = atoms.get_tags()  # ASE: 1 = top layer ... 3 = bottom, 0 = adsorbate
        atoms.set_constraint(FixAtoms(mask=layer == 3))
        atoms.set_tags(np.where(layer == 0, 2, np.where(layer == 1, 1, 0)))
        atoms.pbc = True
        atoms.rattle(0.05, seed=seed + i)
        if labels:
            atoms.calc = EMT()
            results = {
                "energy": atoms.get_potential_energy(),
                "forces": atoms.get_forces(),
                "stress": atoms.get_stress(),
            }
            atoms.calc = SinglePointCalculator(atoms, **results)
            atoms.info["relaxed_energy"] = results["energy"] - 1.0
        atoms.new_array("relaxed_positions", atoms.positions + 0.01)
        frames.append(atoms)
    return frames


def write_db(path: Path, frames: list[Atoms], **connect_kwargs) -> Path:
    """An ASE database (type from the suffix): IS2RE labels in key_value_pairs and data."""
    db = ase.db.connect(str(path), **connect_kwargs)
    for atoms in frames:
        plain = atoms.copy()
        plain.calc = atoms.calc
        relaxed = plain.arrays.pop("relaxed_positions")
        kvp = {k: plain.info[k] for k in ("relaxed_energy", "sid") if k in plain.info}
        db.write(plain, data={"relaxed_positions": relaxed}, **kvp)
    del db  # the aselmdb backend closes its LMDB environment on deletion
    return path


def write_inputs(folder: Path, frames: list[Atoms]) -> dict[str, Path]:
    """``frames`` as extxyz, traj, sqlite db, json db and aselmdb files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"extxyz": folder / "frames.xyz", "traj": folder / "frames.traj"}
    ase.io.write(paths["extxyz"], frames, format="extxyz")
    ase.io.write(paths["traj"], frames)
    for name, suffix in (("db", ".db"), ("json", ".json"), ("aselmdb", ".aselmdb")):
        paths[name] = write_db(folder / f"frames{suffix}", frames)
    return paths


def write_pymatgen_folder(folder: Path, frames: list[Atoms], targets: bool = True) -> list[Path]:
    """Frames as alternating CIF and POSCAR (with selective dynamics) files, plus ``id_prop.csv``."""
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter
    from pymatgen.io.vasp import Poscar

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i, atoms in enumerate(frames):
        structure = AseAtomsAdaptor.get_structure(atoms)
        if i % 2:
            path = folder / f"POSCAR_{i:02d}"
            Poscar(structure).write_file(path)
        else:
            path = folder / f"s{i:02d}.cif"
            CifWriter(structure.remove_site_property("selective_dynamics")).write_file(path)
        paths.append(path)
        rows.append(f"{path.stem},{float(atoms.info.get('relaxed_energy', 0.0))!r}\n")
    if targets:
        (folder / "id_prop.csv").write_text("".join(rows))
    return paths


def reference_frames(path: Path, kind: str) -> list[Atoms]:
    """What ASE itself reads back from ``path`` (extxyz rounds positions to 8 decimals)."""
    if kind in ("db", "json", "aselmdb"):
        return [row.toatoms() for row in ase.db.connect(str(path), use_lock_file=False).select(sort="id")]
    return ase.io.read(path, index=":")


def read_dataset(path: Path) -> tuple[list[dict], list[dict], list[list[bytes]]]:
    """Records (in shard and numeric key order), each shard's metadata and raw keys."""
    records, metas, keys = [], [], []
    for shard in lmdb_shards.shard_paths(path):
        env = lmdb_shards.reader(shard)
        metas.append(read_metadata(env, shard))
        with env.begin() as txn:
            shard_keys = [k for k in txn.cursor().iternext(values=False) if k.isdigit()]
            keys.append(shard_keys)
            for key in lmdb_shards.numeric_keys(env):
                records.append(decode(txn.get(lmdb_shards.record_key(key)), shard, key))
    return records, metas, keys


def assert_record_matches(record: dict, atoms: Atoms, stress: bool = True) -> None:
    """Geometry and S2EF labels of ``record`` equal those of ``atoms`` at the stored precision."""
    f32 = np.float32
    np.testing.assert_array_equal(record["positions"], atoms.positions.astype(f32))
    np.testing.assert_array_equal(record["atomic_numbers"], atoms.numbers)
    np.testing.assert_array_equal(record["cell"], atoms.cell.array.astype(f32))
    np.testing.assert_array_equal(record["pbc"], atoms.pbc)
    np.testing.assert_array_equal(record["tags"], atoms.get_tags())
    fixed = np.zeros(len(atoms), bool)
    fixed[atoms.constraints[0].index] = True
    np.testing.assert_array_equal(record["fixed"], fixed)
    assert record["energy"] == f32(atoms.get_potential_energy())
    np.testing.assert_array_equal(record["forces"], atoms.get_forces().astype(f32))
    if stress:
        np.testing.assert_array_equal(record["stress"], atoms.get_stress(voigt=False).astype(f32))
