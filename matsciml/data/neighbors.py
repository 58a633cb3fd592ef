"""Periodic radius graphs, built on the fly with vesin.

The graph stores only topology: which atom pairs interact and through which periodic
image. Distances are never stored; a model recomputes every edge vector from positions,
cell and shifts inside its differentiable forward pass, so autograd forces see them::

    vector[e] = positions[j] - positions[i] + cell_shifts[e] @ cell    # i = centre, j = neighbour
"""

from __future__ import annotations

import numpy as np
import vesin

DEFAULT_CUTOFF = 6.0
DEFAULT_MAX_NEIGHBORS = 50
# Distances closer than this count as equal, so that the neighbours kept under
# max_neighbors do not depend on rounding noise in symmetric crystals.
_TIE_TOLERANCE = 1e-6


def radius_graph(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float = DEFAULT_CUTOFF,
    max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
) -> tuple[np.ndarray, np.ndarray]:
    """All neighbour pairs within ``cutoff``, in both directions, with periodic images.

    Small cells (cutoff larger than half the cell) give several images of the same
    neighbour, including images of an atom itself (``i == j`` with a non-zero shift).
    With ``max_neighbors``, each centre keeps its nearest neighbours; ties are broken by
    neighbour index, then shift, so the result does not depend on vesin's internal order.

    Args:
        positions: Cartesian positions in Å.
        cell: lattice vectors as rows, Å. Ignored along non-periodic directions.
        pbc: periodicity along each lattice vector.
        cutoff: interaction radius in Å.
        max_neighbors: keep at most this many neighbours per centre (``None``: all).

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
    positions = np.asarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not pbc.any():
        cell = np.zeros((3, 3))  # vesin ignores the box then; a stale cell must not matter
    # One thread: graphs are built per structure inside DataLoader workers, which already
    # run in parallel; vesin's default (all cores) would oversubscribe them.
    calculator = vesin.NeighborList(cutoff=cutoff, full_list=True, n_threads=1)
    i, j, shifts, distances = calculator.compute(positions, cell, pbc, quantities="ijSd", copy=True)
    i, j, shifts = i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64)
    rank = np.rint(distances / _TIE_TOLERANCE).astype(np.int64)
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, rank, i))
    i, j, shifts = i[order], j[order], shifts[order]
    if max_neighbors is not None and len(i):
        starts = np.searchsorted(i, i, side="left")  # i is sorted: first edge of each centre
        keep = np.arange(len(i)) - starts < max_neighbors
        i, j, shifts = i[keep], j[keep], shifts[keep]
    return np.stack([j, i]), shifts


class RadiusGraph:
    """Record transform adding ``edge_index`` and ``cell_shifts`` (see :func:`radius_graph`).

    Args:
        cutoff: interaction radius in Å.
        max_neighbors: neighbours kept per centre, nearest first (``None``: all).
        allow_isolated: accept a structure with no pair inside the cutoff; by default it
            is an error, since a graph model would then see no geometry at all.
    """

    def __init__(
        self,
        cutoff: float = DEFAULT_CUTOFF,
        max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
        allow_isolated: bool = False,
    ):
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.allow_isolated = allow_isolated

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        edge_index, shifts = radius_graph(
            record["positions"], record["cell"], record["pbc"], self.cutoff, self.max_neighbors
        )
        if edge_index.shape[1] == 0 and not self.allow_isolated:
            raise ValueError(
                f"no atom pair lies within the {self.cutoff} Å cutoff; raise the cutoff or check the"
                " positions and cell"
            )
        record["edge_index"] = edge_index
        record["cell_shifts"] = shifts
        return record

    def __repr__(self) -> str:
        return f"RadiusGraph(cutoff={self.cutoff}, max_neighbors={self.max_neighbors})"
