"""The one declaration of every field a structure record or batch may carry.

A *record* is one structure as a ``dict[str, numpy.ndarray]`` keyed by the names
below. A :class:`~matsciml.data.batch.Batch` holds the same names as tensors for
many structures. Collation is driven by :attr:`Field.level`:

* ``atom`` fields are concatenated along their first axis (``N`` = atoms in the batch);
* ``edge`` fields are concatenated along :attr:`Field.cat_dim`; index fields are
  offset by the number of atoms before each structure;
* ``structure`` fields are stacked, gaining a leading ``B`` axis;
* ``derived`` fields are never stored in records; collation builds them.

Units follow the field's convention: energy eV, length Å, forces eV/Å, stress eV/Å^3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Level = Literal["atom", "edge", "structure", "derived"]


@dataclass(frozen=True)
class Field:
    """How one field is stored, checked and collated.

    Args:
        name: key in records and attribute name on a batch.
        level: ``atom``, ``edge``, ``structure`` or ``derived`` (see module docstring).
        dtype: numpy dtype of the stored array (floats are cast to the batch dtype).
        shape: shape of one record's array; ``"N"`` stands for the atom count and
            ``"E"`` for the edge count.
        units: physical units, or ``""`` for dimensionless / integer data.
        doc: one line for people.
        cat_dim: axis along which records are concatenated (atom and edge fields).
        is_index: whether values index atoms and must be offset when batching.
    """

    name: str
    level: Level
    dtype: type
    shape: tuple[int | str, ...]
    units: str
    doc: str
    cat_dim: int = 0
    is_index: bool = False
    is_float: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        # computed once: np.issubdtype is slow enough to show up per record
        object.__setattr__(self, "is_float", bool(np.issubdtype(self.dtype, np.floating)))


# --- geometry and identity (every record) -------------------------------------------
POSITIONS = "positions"  # (num_atoms, 3) Å
ATOMIC_NUMBERS = "atomic_numbers"  # (num_atoms,)
CELL = "cell"  # (3, 3) Å, rows are lattice vectors
PBC = "pbc"  # (3,) bool
NATOMS = "natoms"  # () atoms in the structure
TAGS = "tags"  # (num_atoms,) 0 sub-surface, 1 surface, 2 adsorbate
FIXED = "fixed"  # (num_atoms,) True where the atom is held fixed
SID = "sid"  # () system id
FID = "fid"  # () frame id within the system's trajectory
# --- targets --------------------------------------------------------------------------
ENERGY = "energy"  # () eV, total (possibly reference-subtracted) energy of this frame
FORCES = "forces"  # (num_atoms, 3) eV/Å
STRESS = "stress"  # (3, 3) eV/Å^3
INITIAL_ENERGY = "initial_energy"  # () eV, OC20 y_init
RELAXED_ENERGY = "relaxed_energy"  # () eV, OC20 y_relaxed (adsorption energy)
RELAXED_POSITIONS = "relaxed_positions"  # (num_atoms, 3) Å, OC20 pos_relaxed
# --- graph (added by the radius-graph transform) -----------------------------------
EDGE_INDEX = "edge_index"  # (2, num_edges) row 0 neighbour j, row 1 centre i
CELL_SHIFTS = "cell_shifts"  # (num_edges, 3) integer lattice shifts of the neighbour
# --- built by collation ------------------------------------------------------------
STRUCTURE_INDEX = "structure_index"  # (num_atoms,) which structure each atom belongs to
PTR = "ptr"  # (num_structures + 1,) atom offsets of each structure
POINT_INDEX = "point_index"  # (num_structures, max_points) atom index of each point cloud slot
POINT_MASK = "point_mask"  # (num_structures, max_points) True for real points, False for padding
POINT_FEATURES = "point_features"  # (num_structures, max_points, num_species) one-hot, 0 on padding


FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field(POSITIONS, "atom", np.float32, ("N", 3), "Å", "Cartesian positions"),
        Field(ATOMIC_NUMBERS, "atom", np.int64, ("N",), "", "atomic numbers Z"),
        Field(TAGS, "atom", np.int64, ("N",), "", "OC20 tags: 0 sub-surface, 1 surface, 2 adsorbate"),
        Field(FIXED, "atom", np.bool_, ("N",), "", "True where the atom is held fixed"),
        Field(FORCES, "atom", np.float32, ("N", 3), "eV/Å", "forces, -dE/dpositions"),
        Field(RELAXED_POSITIONS, "atom", np.float32, ("N", 3), "Å", "positions after relaxation"),
        Field(
            EDGE_INDEX, "edge", np.int64, (2, "E"), "", "row 0 neighbour j, row 1 centre i", cat_dim=1, is_index=True
        ),
        Field(
            CELL_SHIFTS,
            "edge",
            np.int64,
            ("E", 3),
            "",
            "integer lattice shifts S: vector i->j is pos[j] - pos[i] + S @ cell",
        ),
        Field(CELL, "structure", np.float32, (3, 3), "Å", "lattice vectors as rows"),
        Field(PBC, "structure", np.bool_, (3,), "", "periodic along each lattice vector"),
        Field(NATOMS, "structure", np.int64, (), "", "number of atoms"),
        Field(SID, "structure", np.int64, (), "", "system id"),
        Field(FID, "structure", np.int64, (), "", "frame id in the system's trajectory"),
        Field(ENERGY, "structure", np.float32, (), "eV", "total energy of this frame"),
        Field(STRESS, "structure", np.float32, (3, 3), "eV/Å^3", "stress, dE/dstrain / volume"),
        Field(INITIAL_ENERGY, "structure", np.float32, (), "eV", "energy of the initial structure"),
        Field(RELAXED_ENERGY, "structure", np.float32, (), "eV", "relaxed (adsorption) energy"),
        Field(STRUCTURE_INDEX, "derived", np.int64, ("N",), "", "structure index of each atom"),
        Field(PTR, "derived", np.int64, ("B+1",), "", "atom offset of each structure, then N"),
        Field(POINT_INDEX, "derived", np.int64, ("B", "M"), "", "atom index of each point-cloud slot"),
        Field(POINT_MASK, "derived", np.bool_, ("B", "M"), "", "True for real points, False for padding"),
        Field(
            POINT_FEATURES, "derived", np.float32, ("B", "M", "S"), "", "one-hot species of each point, zero on padding"
        ),
    )
}

#: Fields every record must hold (cell, pbc, tags and fixed have defaults); targets depend on the task.
REQUIRED = (POSITIONS, ATOMIC_NUMBERS)

#: Target fields each task needs in its records.
TASK_TARGETS: dict[str, tuple[str, ...]] = {
    "s2ef": (ENERGY, FORCES),
    "is2re": (RELAXED_ENERGY,),
}

#: Fields stored on disk (everything but the derived ones and the graph, built on the fly).
STORED = tuple(n for n, f in FIELDS.items() if f.level in ("atom", "structure"))
