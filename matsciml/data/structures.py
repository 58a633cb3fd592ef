"""Batches straight from ASE ``Atoms``: for calculators, tests and interactive use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from matsciml.data import keys as K
from matsciml.data.batch import Batch, collate
from matsciml.data.errors import DataError
from matsciml.data.min_distance import DEFAULT_MIN_DISTANCE, MinDistance
from matsciml.data.neighbors import DEFAULT_CUTOFF, DEFAULT_MAX_NEIGHBORS, RadiusGraph
from matsciml.data.pointcloud import PointCloudCollate
from matsciml.data.records import validate_record


def atoms_record(atoms: Atoms, index: int = 0) -> dict[str, np.ndarray]:
    """The geometry of ``atoms`` as a validated record (no targets; tags kept, fixed from FixAtoms)."""
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if type(constraint).__name__ == "FixAtoms":
            fixed[constraint.get_indices()] = True
    record = {
        K.POSITIONS: atoms.positions,
        K.ATOMIC_NUMBERS: atoms.numbers,
        K.CELL: atoms.cell.array,
        K.PBC: atoms.pbc,
        K.TAGS: atoms.get_tags(),
        K.FIXED: fixed,
        K.SID: index,
    }
    return validate_record(record, "<atoms>", index)


def batch_from_atoms(
    structures: Atoms | Sequence[Atoms],
    cutoff: float = DEFAULT_CUTOFF,
    max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
    dtype: torch.dtype = torch.float32,
    representation: str = "graph",
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> Batch:
    """A batch of one or more structures, with floating fields in ``dtype``.

    ``representation="graph"`` (default) adds the radius graph; ``"point_cloud"`` collates
    with :class:`~matsciml.data.pointcloud.PointCloudCollate`, as the data pipeline does,
    and keeps every atom (no sub-surface sampling: a calculator needs forces on all atoms);
    ``cutoff`` and ``max_neighbors`` are then unused.

    ``max_neighbors`` defaults to none (every pair within ``cutoff``), as in the data modules.

    Positions keep their full precision when ``dtype`` is float64 (records store float32,
    but here the Atoms' own coordinates are used).

    Atoms closer than ``min_distance`` (Å; ``0``: no check) are refused with a
    :class:`~matsciml.data.errors.DataError` naming the structure's index and the two atoms,
    the rule of :mod:`matsciml.data.min_distance`; atoms without neighbours are fine.
    """
    if representation not in ("graph", "point_cloud"):
        raise ValueError(f"representation must be 'graph' or 'point_cloud', got {representation!r}")
    if isinstance(structures, Atoms):
        structures = [structures]
    # the rule is checked on the exact coordinates, not the float32 copies in the records
    check = RadiusGraph(cutoff, max_neighbors, min_distance) if representation == "graph" else MinDistance(min_distance)
    records = []
    for index, atoms in enumerate(structures):
        try:
            exact = {**atoms_record(atoms, index), K.POSITIONS: atoms.positions, K.CELL: atoms.cell.array}
            records.append(check(exact))
        except DataError:
            raise
        except ValueError as err:
            raise DataError("<atoms>", f"{atoms.get_chemical_formula()}: {err}", index) from None
    if representation == "graph":
        batch = collate(records).to(dtype=dtype)
    else:
        batch = PointCloudCollate()(records).to(dtype=dtype)
    # collate stores float32; restore exact coordinates and cells for float64 work
    positions = np.concatenate([atoms.positions for atoms in structures])
    cells = np.stack([atoms.cell.array for atoms in structures])
    return batch.replace(positions=torch.as_tensor(positions, dtype=dtype), cell=torch.as_tensor(cells, dtype=dtype))
