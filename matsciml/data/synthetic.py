"""Fast synthetic OC20-sized datasets, for benchmarks and loader tests at scale.

Each structure is a jittered fcc(100) slab of a random metal (4-5 x 4-5 atoms, 3-5
layers, 48-100 atoms) with a chain of 1-4 H/C/N/O adsorbate atoms on top, in an orthogonal
cell periodic in all directions with :data:`VACUUM` Å of vacuum above and below. Tags and
``fixed`` follow OC20 (0 sub-surface, 1 top layer, 2 adsorbate; layers below the top two
fixed).

Labels come from a smooth Morse pair potential (:func:`pair_energy_forces`), so they are
cheap but physically consistent: forces are exactly ``-dE/dpositions`` (to float32, the
stored precision, as labels are computed on float32-rounded positions). They are *not*
a model of any real material.

* S2EF: ``energy`` is the total pair energy, ``forces`` act on every atom.
* IS2RE: ``relaxed_positions`` come from :data:`RELAX_STEPS` capped steepest-descent
  steps on the free atoms (a partial relaxation, for speed); ``initial_energy`` and
  ``relaxed_energy`` are adsorption energies of the pair model: the pair terms that
  involve an adsorbate atom (isolated atoms are the zero of energy).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from matsciml.data import keys as K
from matsciml.data.formats.store import DatasetWriter
from matsciml.data.progress import progress_bar

#: fcc lattice constants (Å) and pair-potential well depths (eV) of the slab metals.
METALS = {  # Z: (lattice constant, depth)
    28: (3.52, 0.42),
    29: (3.61, 0.34),
    46: (3.89, 0.40),
    47: (4.09, 0.30),
    78: (3.92, 0.50),
    79: (4.08, 0.38),
    13: (4.05, 0.28),
}
ADSORBATE_NUMBERS = (1, 6, 7, 8)
#: Pair-potential radius (Å; r0 = R_i + R_j) and depth (eV; D = sqrt(D_i D_j)) of the adsorbates.
ADSORBATE_PARAMS = {1: (0.37, 0.9), 6: (0.70, 1.2), 7: (0.68, 1.1), 8: (0.66, 1.0)}
MORSE_ALPHA = 1.6  # 1/Å
#: Smooth cutoff: the potential is switched off between these radii (Å).
SWITCH_ON, CUTOFF = 3.0, 3.7
VACUUM = 8.0
FREE_LAYERS = 2
RELAX_STEPS, MAX_MOVE = 5, 0.1  # IS2RE partial relaxation: steps, largest move per step (Å)
#: (x, y, layers) repetitions giving 48-100 slab atoms. At least 4 x 4 surface cells keep
#: every cell wider (>= 9.96 Å) than twice the relaxation's neighbour radius of 4.7 Å, so the
#: minimum image stays exact (see neighbor_pairs).
SLAB_SHAPES = tuple((nx, ny, nl) for nx in (4, 5) for ny in (4, 5) for nl in (3, 4, 5) if nx * ny * nl <= 100)

_MAX_Z = 119
_RADIUS = np.zeros(_MAX_Z)
_DEPTH = np.zeros(_MAX_Z)
for _z, (_a, _d) in METALS.items():
    _RADIUS[_z], _DEPTH[_z] = _a / (2 * np.sqrt(2)), _d  # r0 of a metal pair = nearest-neighbour distance
for _z, (_r, _d) in ADSORBATE_PARAMS.items():
    _RADIUS[_z], _DEPTH[_z] = _r, _d


@lru_cache(maxsize=256)
def _upper_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, k=1)


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, radius: float = CUTOFF):
    """Every pair ``i < j`` closer than ``radius``, through the minimum periodic image.

    The minimum image is exact because the cell is orthogonal, ``radius`` is below half
    its smallest lateral length (9.96 Å for the smallest synthetic cell), and the vacuum
    keeps z images out of range.

    Returns:
        ``(i, j, offsets)``: the displacement of a pair is ``x[j] - x[i] + offsets``.

    Shapes:
        i, j: (num_pairs,); offsets: (num_pairs, 3).
    """
    lengths = np.diag(cell)[:2]
    if radius >= lengths.min() / 2:
        raise ValueError(f"radius {radius} Å needs a cell wider than {2 * radius} Å, got {lengths}")
    i, j = _upper_pairs(len(positions))
    delta = positions[j] - positions[i]
    offsets = np.zeros_like(delta)
    offsets[:, :2] = -lengths * np.round(delta[:, :2] / lengths)
    delta += offsets
    keep = np.flatnonzero(np.einsum("pk,pk->p", delta, delta) < radius**2)
    return i[keep], j[keep], offsets[keep]


def _pair_terms(positions: np.ndarray, numbers: np.ndarray, pairs) -> tuple[np.ndarray, np.ndarray]:
    """Energy of each pair (eV) and the force each exerts on its atom ``i`` (eV/Å)."""
    i, j, offsets = pairs
    delta = positions[j] - positions[i] + offsets
    r = np.sqrt(np.einsum("pk,pk->p", delta, delta))
    r0 = _RADIUS[numbers[i]] + _RADIUS[numbers[j]]
    depth = np.sqrt(_DEPTH[numbers[i]] * _DEPTH[numbers[j]])
    e = np.exp(-MORSE_ALPHA * (r - r0))
    morse = depth * ((1 - e) ** 2 - 1)
    dmorse = depth * 2 * (1 - e) * MORSE_ALPHA * e
    x = np.clip((r - SWITCH_ON) / (CUTOFF - SWITCH_ON), 0.0, 1.0)
    switch = 0.5 * (1 + np.cos(np.pi * x))
    dswitch = np.where(x > 0, -0.5 * np.pi * np.sin(np.pi * x) / (CUTOFF - SWITCH_ON), 0.0)
    inside = r < CUTOFF
    phi = np.where(inside, morse * switch, 0.0)
    dphi = np.where(inside, dmorse * switch + morse * dswitch, 0.0)
    # E = phi(|x_j - x_i|): dE/dx_i = -phi'(r) delta / r, so atom i feels +phi'(r) delta / r.
    return phi, (dphi / r)[:, None] * delta


def pair_energy_forces(
    positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, pairs: tuple | None = None
) -> tuple[float, np.ndarray]:
    """Energy (eV) and forces (eV/Å) of the synthetic Morse pair potential.

    Args:
        positions: Cartesian positions.
        numbers: atomic numbers (metals of :data:`METALS` and H, C, N, O).
        cell: orthogonal cell, lattice vectors as rows, wider than ``2 * CUTOFF`` in x and y
            and with more than ``CUTOFF`` of vacuum along z.
        pairs: a :func:`neighbor_pairs` list to reuse (any radius >= ``CUTOFF``).

    Shapes:
        positions: (num_atoms, 3); numbers: (num_atoms,); cell: (3, 3); forces: (num_atoms, 3).
    """
    pairs = neighbor_pairs(positions, cell) if pairs is None else pairs
    phi, force_on_i = _pair_terms(positions, numbers, pairs)
    i, j, _ = pairs
    n = len(positions)
    forces = np.stack(
        [np.bincount(i, force_on_i[:, k], n) - np.bincount(j, force_on_i[:, k], n) for k in range(3)], axis=1
    )
    return float(phi.sum()), forces


def adsorption_energy(
    positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, ads: np.ndarray, pairs: tuple | None = None
) -> float:
    """Sum of the pair terms that touch an adsorbate atom (``ads`` True), in eV.

    Equals the total pair energy minus that of the slab alone at the same positions.
    """
    pairs = neighbor_pairs(positions, cell) if pairs is None else pairs
    phi = _pair_terms(positions, numbers, pairs)[0]
    i, j, _ = pairs
    return float(phi[ads[i] | ads[j]].sum())


def _structure(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One jittered slab + adsorbate chain, with tags, fixed flags and float32-exact geometry."""
    metal = list(METALS)[rng.integers(len(METALS))]
    a = METALS[metal][0]
    nx, ny, layers = SLAB_SHAPES[rng.integers(len(SLAB_SHAPES))]
    spacing, dz = a / np.sqrt(2), a / 2
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(layers), indexing="ij")
    shift = 0.5 * (k % 2)  # fcc(100) stacking: every other layer sits in the hollows
    slab = np.stack([(i + shift) * spacing, (j + shift) * spacing, VACUUM + k * dz], -1).reshape(-1, 3)
    layer_from_top = (layers - 1 - k).reshape(-1)
    free = layer_from_top < FREE_LAYERS
    slab[free] += rng.normal(0.0, 0.08, (int(free.sum()), 3))

    num_ads = int(rng.integers(1, 5))
    ads = np.empty((num_ads, 3))
    ads[0] = [*(rng.uniform(0, 1, 2) * [nx * spacing, ny * spacing]), slab[:, 2].max() + rng.uniform(1.7, 2.2)]
    for m in range(1, num_ads):  # an upward-leaning chain
        direction = rng.normal(size=3)
        direction[2] = abs(direction[2]) + 1.0
        ads[m] = ads[m - 1] + rng.uniform(1.0, 1.4) * direction / np.linalg.norm(direction)

    cell = np.diag([nx * spacing, ny * spacing, ads[:, 2].max() + VACUUM])  # slab starts at z = VACUUM
    numbers = np.r_[np.full(len(slab), metal), rng.choice(ADSORBATE_NUMBERS, num_ads)].astype(np.int64)
    positions = np.vstack([slab, ads])
    positions[:, :2] %= np.diag(cell)[:2]  # wrap into the cell
    return {
        K.POSITIONS: positions.astype(np.float32),
        K.ATOMIC_NUMBERS: numbers,
        K.CELL: cell.astype(np.float32),
        K.PBC: np.ones(3, dtype=np.bool_),
        K.TAGS: np.r_[np.where(layer_from_top == 0, 1, 0), np.full(num_ads, 2)].astype(np.int64),
        K.FIXED: np.r_[~free, np.zeros(num_ads, dtype=bool)],
    }


def _relax(positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, free: np.ndarray, pairs) -> np.ndarray:
    """:data:`RELAX_STEPS` steepest-descent steps on the free atoms, each move capped at :data:`MAX_MOVE` Å.

    ``pairs`` is built once with a skin of twice the total travel, so it stays exact throughout.
    """
    positions = positions.copy()
    for _ in range(RELAX_STEPS):
        step = 0.02 * pair_energy_forces(positions, numbers, cell, pairs)[1][free]
        norm = np.linalg.norm(step, axis=1, keepdims=True)
        positions[free] += step * np.minimum(1.0, MAX_MOVE / np.maximum(norm, 1e-12))
    return positions


def synthetic_record(rng: np.random.Generator, task: str = "s2ef", sid: int = 0) -> dict[str, np.ndarray]:
    """One labelled synthetic structure for ``task`` (``"s2ef"`` or ``"is2re"``)."""
    record = _structure(rng)
    positions = record[K.POSITIONS].astype(np.float64)
    cell = record[K.CELL].astype(np.float64)
    numbers = record[K.ATOMIC_NUMBERS]
    record[K.SID] = np.asarray(sid, dtype=np.int64)
    if task == "s2ef":
        energy, forces = pair_energy_forces(positions, numbers, cell)
        record.update(
            {
                K.FID: np.asarray(0, dtype=np.int64),
                K.ENERGY: np.asarray(energy, np.float32),
                K.FORCES: forces.astype(np.float32),
            }
        )
        return record
    ads = record[K.TAGS] == 2
    pairs = neighbor_pairs(positions, cell, CUTOFF + 2 * RELAX_STEPS * MAX_MOVE)
    relaxed = _relax(positions, numbers, cell, ~record[K.FIXED], pairs).astype(np.float32)
    initial_energy = adsorption_energy(positions, numbers, cell, ads, pairs)
    relaxed_energy = adsorption_energy(relaxed.astype(np.float64), numbers, cell, ads, pairs)
    record.update(
        {
            K.RELAXED_POSITIONS: relaxed,
            K.INITIAL_ENERGY: np.asarray(initial_energy, np.float32),
            K.RELAXED_ENERGY: np.asarray(relaxed_energy, np.float32),
        }
    )
    return record


def write_synthetic(
    destination: str | os.PathLike,
    num_structures: int = 10_000,
    task: str = "s2ef",
    seed: int = 0,
    records_per_shard: int | None = 5_000,
    overwrite: bool = False,
    title: str | None = None,
    progress: bool = True,
) -> dict:
    """Write ``num_structures`` synthetic structures as a matsciml dataset.

    Args:
        destination: dataset directory to create.
        num_structures: number of records.
        task: ``"s2ef"`` or ``"is2re"``.
        seed: seed of the generator; the same seed gives the same records.
        records_per_shard: records per ``data.NNNN.lmdb``; ``None`` writes one ``data.lmdb``.
        overwrite: replace an existing dataset.
        title: dataset card title (default names the size and task).
        progress: show a progress bar.

    Returns:
        The dataset card written to every shard.
    """
    if task not in K.TASK_TARGETS:
        raise ValueError(f"task must be one of {sorted(K.TASK_TARGETS)}, got {task!r}")
    if num_structures < 1:
        raise ValueError(f"num_structures must be at least 1, got {num_structures}")
    rng = np.random.default_rng(seed)
    destination = Path(destination)
    writer = DatasetWriter(
        destination,
        task=task,
        records_per_shard=records_per_shard,
        overwrite=overwrite,
        license="MIT (generated by matsciml, like its code)",
        title=title or f"synthetic {task.upper()} ({num_structures} structures, seed {seed})",
        source=f"matsciml.data.synthetic (seed {seed}): jittered fcc(100) slabs with H/C/N/O adsorbates,"
        " labels from a Morse pair potential (not a real material)",
    )
    try:
        with progress_bar(unit="records", disable=not progress) as bar:
            bar_task = bar.add_task(f"synthetic {task}", total=num_structures)
            for sid in range(num_structures):
                writer.add(synthetic_record(rng, task, sid), destination, sid)
                if sid % 500 == 499:  # redrawing per record would cost more than the record
                    bar.advance(bar_task, 500)
            bar.update(bar_task, completed=num_structures)
    except BaseException as err:
        writer.fail(err)  # drops the partial dataset; a full disk is a DiskFullError
        raise
    return writer.close()
