"""Slab + adsorbate systems labelled with ASE's EMT calculator, for the shipped devsets.

The building blocks of :mod:`matsciml.data.devset_builder`: catalyst slabs from
``ase.build`` with OC20 tags and fixed bottom layers, adsorbates made of H, C, N and O,
gas-phase references, and EMT labels computed on exactly the positions that are stored.

Conventions (as in OC20):

* tags: 0 sub-surface slab atom, 1 surface (top layer) atom, 2 adsorbate atom;
* ``fixed``: every slab layer below the top two is held fixed (``FixAtoms``);
* cells are periodic in all three directions, with :data:`VACUUM` Å of vacuum on each
  side of the slab, so a 6 Å radius graph never reaches the periodic image across z.

Labels are computed on positions and cells rounded to float32 (the stored dtype), so
re-running EMT on a stored record reproduces its energy and forces to float32 precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from ase import Atoms
from ase.build import fcc100, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from matsciml.data import keys as K
from matsciml.data.records import Record

#: Metals EMT has parameters for (all fcc).
METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
#: Slab builders by facet and the (x, y, layers) repetitions used for each (27-36 atoms).
FACETS = {"111": fcc111, "100": fcc100, "211": fcc211}
SLAB_SIZES = {
    "111": ((3, 3, 3), (3, 3, 4), (4, 3, 3)),
    "100": ((3, 3, 3), (3, 3, 4), (4, 3, 3)),
    "211": ((3, 3, 3), (3, 3, 4)),  # fcc211 needs x = 3 (atoms across one step)
}
#: Vacuum (Å) above and below the slab: the gap between periodic images is ~2x this, minus
#: the adsorbate height, comfortably above a 6 Å cutoff.
VACUUM = 7.0
#: Slab layers counted from the top that are free to move; the rest are fixed.
FREE_LAYERS = 2

#: Adsorbates: symbols (binding atom first) and starting positions relative to the binding
#: atom (Å); :func:`adsorbate_geometry` relaxes them with EMT before use.
ADSORBATES: dict[str, tuple[tuple[str, ...], tuple[tuple[float, float, float], ...]]] = {
    "H": (("H",), ((0, 0, 0),)),
    "O": (("O",), ((0, 0, 0),)),
    "N": (("N",), ((0, 0, 0),)),
    "C": (("C",), ((0, 0, 0),)),
    "OH": (("O", "H"), ((0, 0, 0), (0, 0, 0.97))),
    "CO": (("C", "O"), ((0, 0, 0), (0, 0, 1.15))),
    "NO": (("N", "O"), ((0, 0, 0), (0, 0, 1.17))),
    "CH": (("C", "H"), ((0, 0, 0), (0, 0, 1.09))),
    "NH": (("N", "H"), ((0, 0, 0), (0, 0, 1.02))),
    "OH2": (("O", "H", "H"), ((0, 0, 0), (0.76, 0, 0.59), (-0.76, 0, 0.59))),
    "CH2": (("C", "H", "H"), ((0, 0, 0), (0.89, 0, 0.63), (-0.89, 0, 0.63))),
    "NH2": (("N", "H", "H"), ((0, 0, 0), (0.82, 0, 0.60), (-0.82, 0, 0.60))),
    "CH3": (("C", "H", "H", "H"), ((0, 0, 0), (1.03, 0, 0.36), (-0.515, 0.892, 0.36), (-0.515, -0.892, 0.36))),
}
ADSORBATE_TAG = 2


@dataclass(frozen=True)
class SlabSpec:
    """Which clean slab to build.

    Args:
        metal: chemical symbol from :data:`METALS`.
        facet: ``"111"``, ``"100"`` or ``"211"``.
        size: (x, y, layers) repetitions passed to the ``ase.build`` function.
    """

    metal: str
    facet: str
    size: tuple[int, int, int]


def random_spec(rng: np.random.Generator, metals: tuple[str, ...] = METALS) -> SlabSpec:
    """Draw a metal (from ``metals``), a facet and a slab size uniformly."""
    metal = metals[rng.integers(len(metals))]
    facet = tuple(FACETS)[rng.integers(len(FACETS))]
    sizes = SLAB_SIZES[facet]
    return SlabSpec(metal, facet, sizes[rng.integers(len(sizes))])


def random_adsorbate(rng: np.random.Generator) -> str:
    return tuple(ADSORBATES)[rng.integers(len(ADSORBATES))]


def _float32(values: np.ndarray) -> np.ndarray:
    """Round to the stored precision, keeping float64 for the calculator."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def make_slab(spec: SlabSpec) -> Atoms:
    """The bulk-terminated clean slab with OC20 tags and its bottom layers fixed."""
    slab = FACETS[spec.facet](spec.metal, size=spec.size, vacuum=VACUUM)
    slab.pbc = True  # OC20 cells are periodic along z too; the vacuum keeps images apart
    slab.set_cell(_float32(slab.cell.array), scale_atoms=False)
    slab.positions = _float32(slab.positions)
    # Layers by height, not ASE's tags: fcc211 carries none, and this works for every facet.
    per_layer = spec.size[0] * spec.size[1]
    order = np.argsort(-slab.positions[:, 2], kind="stable")
    layer = np.empty(len(slab), dtype=int)
    layer[order] = np.arange(len(slab)) // per_layer  # 0 = top layer
    slab.set_tags(np.where(layer == 0, 1, 0))
    slab.set_constraint(FixAtoms(mask=layer >= FREE_LAYERS))
    return slab


def fixed_mask(atoms: Atoms) -> np.ndarray:
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.index] = True
    return mask


def _rotation(rng: np.random.Generator, max_tilt: float = 0.3) -> np.ndarray:
    """A random spin about z followed by a small tilt (radians), so molecules stay upright."""
    spin, tilt, axis = rng.uniform(0, 2 * np.pi), rng.uniform(0, max_tilt), rng.uniform(0, 2 * np.pi)
    c, s = np.cos(spin), np.sin(spin)
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    u = np.array([np.cos(axis), np.sin(axis), 0.0])  # tilt axis in the surface plane
    ux = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    tilt_matrix = np.eye(3) + np.sin(tilt) * ux + (1 - np.cos(tilt)) * ux @ ux  # Rodrigues
    return tilt_matrix @ rz


@cache
def adsorbate_geometry(name: str) -> np.ndarray:
    """Offsets (Å) of the adsorbate's atoms from its binding atom, relaxed alone with EMT.

    EMT's bond lengths differ from the textbook ones in :data:`ADSORBATES` (O-H 1.03 Å, not
    0.97); starting from EMT's own geometry keeps the first frames' forces physical. The
    templates are symmetric about z, so the relaxation keeps the binding atom at the bottom.
    """
    symbols, offsets = ADSORBATES[name]
    if len(symbols) == 1:
        return np.zeros((1, 3))
    molecule = Atoms(symbols, positions=np.asarray(offsets, float) + 6.0, cell=[12, 12, 12], pbc=False)
    positions = relax(molecule, fmax=1e-3, steps=500).positions
    return positions - positions[0]


def _clearance_height(slab: Atoms, xy: np.ndarray, radius: float) -> np.ndarray:
    """Lowest z at each in-plane point ``xy`` (k, 2) that stays ``radius`` Å from every slab atom.

    Periodic images in the surface plane are included; points with no slab atom within
    ``radius`` in the plane get the slab's top plus ``radius``.
    """
    cell = slab.cell.array[:2, :2]
    shifts = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]) @ cell
    images = (slab.positions[None, :, :2] + shifts[:, None, :]).reshape(-1, 2)  # (9 n, 2)
    z = np.tile(slab.positions[:, 2], len(shifts))
    d2 = np.sum((xy[:, None, :] - images[None]) ** 2, axis=-1)  # (k, 9 n)
    lift = np.where(d2 < radius**2, z + np.sqrt(np.clip(radius**2 - d2, 0.0, None)), -np.inf)
    best = lift.max(axis=1)
    return np.where(np.isfinite(best), best, z.max() + radius)


def place_adsorbate(slab: Atoms, name: str, rng: np.random.Generator) -> Atoms:
    """Put adsorbate ``name`` above a random surface point, its binding atom ~2 Å from the slab.

    The binding atom sits at the lowest height that keeps it a random distance ``r0`` in
    [1.8, 2.2] Å from every slab atom, so it lands in hollows, on bridges or on top alike,
    on any facet. The molecule is then lifted, if needed, so that its other atoms stay
    1.7 Å from the slab (a tilted CH3 must not start inside a step edge).

    Returns:
        A new ``Atoms``: the slab followed by the adsorbate (tag 2, never fixed).
    """
    symbols, offsets = ADSORBATES[name][0], adsorbate_geometry(name)
    point = rng.uniform(0, 1, 2) @ slab.cell.array[:2, :2]
    r0 = rng.uniform(1.8, 2.2)
    height = _clearance_height(slab, point[None], r0)[0]
    positions = np.array([point[0], point[1], height]) + offsets @ _rotation(rng).T
    if len(symbols) > 1:
        needed = _clearance_height(slab, positions[1:, :2], 1.7)
        positions[:, 2] += max(0.0, float(np.max(needed - positions[1:, 2])))
    adsorbate = Atoms(symbols, positions=_float32(positions), tags=[ADSORBATE_TAG] * len(symbols))
    system = slab.copy()
    system.extend(adsorbate)
    system.set_constraint(FixAtoms(indices=np.flatnonzero(fixed_mask(slab))))
    return system


def emt_labels(atoms: Atoms) -> tuple[np.ndarray, float, np.ndarray]:
    """EMT energy (eV) and forces (eV/Å, every atom, fixed ones too) at float32-rounded positions.

    Returns:
        (positions as computed, energy, forces).
    """
    probe = atoms.copy()
    probe.set_constraint()
    probe.positions = _float32(atoms.positions)
    probe.calc = EMT()
    return probe.positions.copy(), float(probe.get_potential_energy()), probe.get_forces()


def emt_energy(atoms: Atoms) -> float:
    return emt_labels(atoms)[1]


def relax(atoms: Atoms, fmax: float = 0.05, steps: int = 150, observer=None) -> Atoms:
    """L-BFGS-relax ``atoms`` in place with EMT (fixed atoms stay put).

    L-BFGS rather than BFGS: BFGS diagonalises a dense 3N x 3N Hessian every step, and the
    multithreaded BLAS behind it spins idle threads that halve throughput on a small machine.

    Args:
        atoms: structure with its constraints set.
        fmax: force convergence criterion (eV/Å) on free atoms.
        steps: maximum number of optimiser steps.
        observer: called with no arguments after every step (and once before the first).
    """
    atoms.calc = EMT()
    optimiser = LBFGS(atoms, logfile=None)
    if observer is not None:
        optimiser.attach(observer, interval=1)
    optimiser.run(fmax=fmax, steps=steps)
    atoms.positions = _float32(atoms.positions)
    return atoms


@cache
def _relaxed_slab_positions(spec: SlabSpec) -> np.ndarray:
    return relax(make_slab(spec), fmax=0.02).positions.copy()


def relaxed_clean_slab(spec: SlabSpec) -> Atoms:
    """The clean slab after EMT relaxation (cached per spec, so each is relaxed once per process)."""
    slab = make_slab(spec)
    slab.positions = _relaxed_slab_positions(spec)
    return slab


@cache
def gas_references() -> dict[str, float]:
    """Per-atom gas-phase reference energies (eV) from EMT-relaxed molecules.

    H = E(H2)/2, O = E(O2)/2, N = E(N2)/2 and C = E(CO) - E(O2)/2, each molecule relaxed
    alone in a non-periodic box to fmax 1e-3 eV/Å.
    """
    bonds = {"H2": ("HH", 0.74), "O2": ("OO", 1.21), "N2": ("NN", 1.10), "CO": ("CO", 1.13)}
    energy = {}
    for name, (symbols, length) in bonds.items():
        molecule = Atoms(symbols, positions=[(0, 0, 0), (0, 0, length)], cell=[12, 12, 12], pbc=False)
        energy[name] = float(relax(molecule, fmax=1e-3, steps=500).get_potential_energy())
    return {
        "H": energy["H2"] / 2,
        "O": energy["O2"] / 2,
        "N": energy["N2"] / 2,
        "C": energy["CO"] - energy["O2"] / 2,
    }


def reference_sum(symbols: list[str]) -> float:
    """Sum of :func:`gas_references` over the given adsorbate atoms."""
    references = gas_references()
    return float(sum(references[s] for s in symbols))


def base_record(atoms: Atoms, sid: int) -> Record:
    """The identity and geometry fields shared by S2EF and IS2RE records."""
    return {
        K.POSITIONS: atoms.positions.astype(np.float32),
        K.ATOMIC_NUMBERS: atoms.numbers.astype(np.int64),
        K.CELL: atoms.cell.array.astype(np.float32),
        K.PBC: np.asarray(atoms.pbc, dtype=np.bool_),
        K.NATOMS: np.asarray(len(atoms), dtype=np.int64),
        K.TAGS: atoms.get_tags().astype(np.int64),
        K.FIXED: fixed_mask(atoms),
        K.SID: np.asarray(sid, dtype=np.int64),
    }
