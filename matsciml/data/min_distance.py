"""The one rule for atoms on top of each other: a pair closer than a minimum distance is refused.

Two atoms 0.05 Å apart are a duplicated or corrupted atom, never chemistry; a model would see
a huge or undefined energy there. Data check, convert, loading and the ASE calculator apply
the same rule (:func:`refuse_close_pairs`), with the same default and the same message, and
periodic images count: atoms 0.05 Å apart across a cell face are too close.

Where a radius graph is built, its neighbour list already holds every distance, so the rule
costs one ``min`` over the edges. Elsewhere (convert, point clouds) :func:`check_min_distance`
compares every pair at its minimum image for small structures (exact while ``min_distance`` is
below half of every periodic cell height), and runs vesin for large ones. Not vesin with
``cutoff=min_distance`` itself: its cell list grows as ``(box / cutoff)^3``, and at 0.1 Å one
devset slab took 67 ms, against 0.26 ms for all its pairs.

Isolated atoms and structures without any neighbour are valid: only pairs that are too close
are refused.
"""

from __future__ import annotations

import numpy as np
import vesin

#: Pairs closer than this (Å) are refused by default; no real bond is shorter than ~0.74 Å (H2).
DEFAULT_MIN_DISTANCE = 0.1


def check_min_distance_setting(min_distance: float | None) -> float:
    """``min_distance`` as a float (``None`` and ``0`` switch the rule off), or a ``ValueError``."""
    value = 0.0 if min_distance is None else float(min_distance)
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"min_distance must be >= 0 Å (0 switches the check off), got {min_distance}")
    return value


def refuse_close_pairs(
    i: np.ndarray, j: np.ndarray, shifts: np.ndarray, distances: np.ndarray, min_distance: float
) -> None:
    """Raise ``ValueError`` naming the closest pair if any pair of the neighbour list is too close.

    Args:
        i, j: atom indices of each pair.
        shifts: integer lattice shift of ``j``'s image for each pair.
        distances: pair distances in Å.
        min_distance: the smallest allowed distance in Å (``0``: no check).

    Shapes:
        i, j, distances: ``(num_pairs,)``; shifts: ``(num_pairs, 3)``.
    """
    if min_distance <= 0 or len(distances) == 0:
        return
    closest = int(np.argmin(distances))
    distance = float(distances[closest])
    if distance >= min_distance:
        return
    first, second = sorted((int(i[closest]), int(j[closest])))
    shift = [int(s) for s in shifts[closest]]
    image = f" (periodic image shifted by {shift} cells)" if any(shift) else ""
    raise ValueError(
        f"atoms {first} and {second} are {distance:.4g} Å apart{image}, closer than the minimum distance "
        f"{min_distance} Å: a duplicated or misplaced atom; fix the structure, or lower min_distance "
        "(--min-distance, data.min_distance; 0 switches the check off)"
    )


def check_min_distance(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    calculator: vesin.NeighborList | None = None,
) -> None:
    """Apply :func:`refuse_close_pairs` to a structure without a radius graph at hand.

    Args:
        positions: Cartesian positions in Å.
        cell: lattice vectors as rows, Å.
        pbc: periodicity along each lattice vector.
        min_distance: the smallest allowed distance in Å (``0``: no check).
        calculator: a reusable half-list ``vesin.NeighborList`` from :func:`min_distance_calculator`,
            for large structures.

    Shapes:
        positions: ``(num_atoms, 3)``; cell: ``(3, 3)``; pbc: ``(3,)``.
    """
    if min_distance <= 0:
        return
    from matsciml.data.neighbors import vesin_inputs

    positions, cell, pbc = vesin_inputs(positions, cell, pbc)
    pairs = _minimum_image_pairs(positions, cell, pbc, min_distance) if len(positions) <= _ALL_PAIRS_ATOMS else None
    if pairs is None:
        calculator = calculator or min_distance_calculator(min_distance)
        pairs = calculator.compute(positions, cell, pbc, quantities="ijSd", copy=False)
    refuse_close_pairs(*pairs, min_distance)


#: up to this many atoms every pair is compared, beyond it vesin is faster (measured: 0.26 vs 0.48 ms
#: at 33 atoms, 3.6 vs 0.5 ms at 256, on a loaded 2-core machine)
_ALL_PAIRS_ATOMS = 100
#: vesin's cutoff is never below this: its cell list grows as (box / cutoff)^3 (67 ms per slab at 0.1 Å)
_VESIN_CUTOFF_FLOOR = 1.0


def _minimum_image_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, min_distance: float):
    """``(i, j, shifts, distances)`` of every pair at its nearest image, or ``None`` where that is not exact.

    A pair closer than ``min_distance`` has fractional separations below ``min_distance / height``
    along each periodic direction, so while ``min_distance`` is under half of every periodic cell
    height, rounding the fractional separation finds that image (and no atom is that close to
    its own image). Tiny or singular cells return ``None`` (vesin handles them).
    """
    i, j = np.triu_indices(len(positions), 1)
    vectors = positions[j] - positions[i]
    shifts = np.zeros((len(i), 3), dtype=np.int64)
    if pbc.any():
        if abs(np.linalg.det(cell)) < 1e-9:  # e.g. a slab without a vector along its vacuum
            return None
        inverse = np.linalg.inv(cell)  # columns: reciprocal vectors, of length 1 / height
        heights = 1.0 / np.linalg.norm(inverse, axis=0)
        if min_distance >= 0.5 * heights[pbc].min():
            return None
        shifts = -np.rint(vectors @ inverse).astype(np.int64) * pbc
        vectors = vectors + shifts @ cell
    return i, j, shifts, np.sqrt(np.einsum("ij,ij->i", vectors, vectors))


def min_distance_calculator(min_distance: float) -> vesin.NeighborList:
    """A half-list vesin neighbour list (each pair once) for :func:`check_min_distance`, on one thread."""
    cutoff = max(min_distance, _VESIN_CUTOFF_FLOOR)  # pairs beyond min_distance are ignored
    try:
        return vesin.NeighborList(cutoff=cutoff, full_list=False, n_threads=1)
    except TypeError:  # vesin 0.4 (torch < 2.3) has no n_threads and uses one thread
        return vesin.NeighborList(cutoff=cutoff, full_list=False)


class MinDistance:
    """Record transform applying the rule where no radius graph is built (point clouds).

    Args:
        min_distance: the smallest allowed distance in Å (``0``: no check).
    """

    def __init__(self, min_distance: float = DEFAULT_MIN_DISTANCE):
        self.min_distance = check_min_distance_setting(min_distance)
        self._calculator = None  # built lazily: vesin objects do not pickle to workers

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_calculator": None}

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.min_distance > 0:
            if self._calculator is None:
                self._calculator = min_distance_calculator(self.min_distance)
            check_min_distance(record["positions"], record["cell"], record["pbc"], self.min_distance, self._calculator)
        return record

    def __repr__(self) -> str:
        return f"MinDistance({self.min_distance})"
