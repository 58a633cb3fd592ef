"""Periodic radius graphs, built on the fly with vesin.

The graph stores only topology: which atom pairs interact and through which periodic
image. Distances are never stored; a model recomputes every edge vector from positions,
cell and shifts inside its differentiable forward pass, so autograd forces see them::

    vector[e] = positions[j] - positions[i] + cell_shifts[e] @ cell    # i = centre, j = neighbour
"""

from __future__ import annotations

import numpy as np
import vesin

from matsciml.data.min_distance import (
    DEFAULT_MIN_DISTANCE,
    check_min_distance,
    check_min_distance_setting,
    refuse_close_pairs,
)

DEFAULT_CUTOFF = 6.0
# Every pair within the cutoff: a cap falls inside a coordination shell (fcc Cu has 78
# neighbours within 6 Å), so the energy jumps where the last kept and first dropped swap.
DEFAULT_MAX_NEIGHBORS: int | None = None
# The OC20 baselines' cap (50 nearest at 6 Å), an explicit opt-in for reproducing them.
OC20_MAX_NEIGHBORS = 50
# Distances closer than this count as equal, so that the neighbours kept under
# max_neighbors do not depend on rounding noise in symmetric crystals.
_TIE_TOLERANCE = 1e-6


def radius_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float = DEFAULT_CUTOFF,
    max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
    calculator: vesin.NeighborList | None = None,
    min_distance: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """All neighbour pairs within ``cutoff``, in both directions, with periodic images.

    Small cells (cutoff larger than half the cell) give several images of the same
    neighbour, including images of an atom itself (``i == j`` with a non-zero shift).
    With ``max_neighbors`` (opt-in; the default keeps every pair), each centre keeps its
    nearest neighbours; ties are broken by neighbour index, then shift, so the result does
    not depend on vesin's internal order. A cap makes the energy surface discontinuous.

    Args:
        positions: Cartesian positions in Å.
        cell: lattice vectors as rows, Å. Ignored along non-periodic directions.
        pbc: periodicity along each lattice vector.
        cutoff: interaction radius in Å.
        max_neighbors: keep at most this many neighbours per centre (``None``: all).
        calculator: a reusable ``vesin.NeighborList`` with this cutoff and ``full_list=True``.
        min_distance: refuse (``ValueError`` naming the atoms) a pair closer than this, in Å; the
            rule of :mod:`matsciml.data.min_distance`, here at the cost of one ``min`` over the pairs.
            ``0`` (default): no check.

    Returns:
        ``edge_index`` (row 0 neighbour ``j``, row 1 centre ``i``) and integer
        ``cell_shifts``, sorted by centre, then distance.

    Shapes:
        positions: ``(num_atoms, 3)``; cell: ``(3, 3)``; pbc: ``(3,)``;
        edge_index: ``(2, num_edges)``; cell_shifts: ``(num_edges, 3)``.
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if max_neighbors is not None and max_neighbors < 1:
        raise ValueError(f"max_neighbors must be a positive integer or None, got {max_neighbors}")
    positions, cell, pbc = vesin_inputs(positions, cell, pbc)
    if min_distance > cutoff:  # pairs beyond the cutoff are not in this neighbour list
        check_min_distance(positions, cell, pbc, min_distance)
    calculator = calculator or neighbor_calculator(cutoff)
    # copy=False: these are views into vesin's buffers, valid until its next call; every
    # array returned below is a fresh one made by fancy indexing.
    i, j, shifts, distances = calculator.compute(positions, cell, pbc, quantities="ijSd", copy=False)
    refuse_close_pairs(i, j, shifts, distances, min_distance)
    # vesin gives uint64 indices (always < 2**63) and int32 shifts: reinterpret, don't copy
    i, j, shifts = i.view(np.int64), j.view(np.int64), shifts.astype(np.int64)
    order = _neighbour_order(i, j, shifts, distances, len(positions))
    if max_neighbors is not None and len(i):
        counts = np.bincount(i, minlength=len(positions))
        if counts.max() > max_neighbors:
            # in sorted order an edge's rank among its centre's edges is its offset from the
            # centre's first edge; select before gathering, so each array is indexed once
            first = np.repeat(np.cumsum(counts) - counts, counts)
            order = order[np.arange(len(order)) - first < max_neighbors]
    edge_index = np.empty((2, len(order)), dtype=np.int64)
    np.take(j, order, out=edge_index[0])
    np.take(i, order, out=edge_index[1])
    return edge_index, shifts[order]


def vesin_inputs(positions, cell, pbc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, cell and pbc as vesin takes them (float64, bool); the cell zeroed without periodicity."""
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not pbc.any():
        cell = np.zeros((3, 3))  # vesin ignores the box then; a stale cell must not matter
    return positions, cell, pbc


def neighbor_calculator(cutoff: float) -> vesin.NeighborList:
    """A full-list vesin neighbour list on one thread, reusable across structures."""
    # One thread: graphs are built per structure inside DataLoader workers, which already
    # run in parallel; vesin's default (all cores) would oversubscribe them. vesin 0.4, the
    # last release that imports beside torch < 2.3, has no n_threads and uses one thread.
    try:
        return vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=1)
    except TypeError:
        return vesin.NeighborList(cutoff=cutoff, full_list=True)


def _neighbour_order(
    i: np.ndarray, j: np.ndarray, shifts: np.ndarray, distances: np.ndarray, num_atoms: int
) -> np.ndarray:
    """Order pairs by centre, distance (to ``_TIE_TOLERANCE``), neighbour index, shift."""
    rank = np.rint(distances / _TIE_TOLERANCE).astype(np.int64)
    span = int(np.abs(shifts).max(initial=0)) * 2 + 1
    shift_code = ((shifts[:, 0] + span // 2) * span + shifts[:, 1] + span // 2) * span + shifts[:, 2] + span // 2
    ranks = int(rank.max(initial=0)) + 1
    # One int64 key sorts several times faster than a multi-key lexsort; fall back when
    # the packed key could overflow (only for very large structures or cells).
    if float(num_atoms) * ranks * num_atoms * span**3 < 2**62:
        key = ((i * ranks + rank) * num_atoms + j) * span**3 + shift_code
        return np.argsort(key)  # keys are unique, so any sort gives the same order
    return np.lexsort((shift_code, j, rank, i))


class RadiusGraph:
    """Record transform adding ``edge_index`` and ``cell_shifts`` (see :func:`radius_graph`).

    Args:
        cutoff: interaction radius in Å.
        max_neighbors: neighbours kept per centre, nearest first (``None``, the default: all
            within the cutoff; a cap makes energies jump where neighbours swap rank).
        min_distance: refuse a pair of atoms closer than this, in Å (``0``: no check); see
            :mod:`matsciml.data.min_distance`.

    Atoms without any neighbour within the cutoff are valid (a structure may have no edges at
    all): models give them the energy of an un-messaged atom plus its element reference.
    """

    def __init__(
        self,
        cutoff: float = DEFAULT_CUTOFF,
        max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
        min_distance: float = DEFAULT_MIN_DISTANCE,
    ):
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.min_distance = check_min_distance_setting(min_distance)
        self._calculator = None  # built lazily: vesin objects do not pickle to workers

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_calculator": None}

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._calculator is None:
            self._calculator = neighbor_calculator(self.cutoff)
        edge_index, shifts = radius_graph(
            record["positions"],
            record["cell"],
            record["pbc"],
            self.cutoff,
            self.max_neighbors,
            self._calculator,
            self.min_distance,
        )
        record["edge_index"] = edge_index
        record["cell_shifts"] = shifts
        return record

    def __repr__(self) -> str:
        settings = f"cutoff={self.cutoff}, max_neighbors={self.max_neighbors}, min_distance={self.min_distance}"
        return f"RadiusGraph({settings})"
