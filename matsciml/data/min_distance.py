"""The one rule for atoms on top of each other: a pair closer than a minimum distance is refused.

Two atoms 0.05 Å apart are a duplicated or corrupted atom, never chemistry; a model would see
a huge or undefined energy there. Data check, convert, loading and the ASE calculator apply
the same rule (:func:`refuse_close_pairs`), with the same default and the same message, and
periodic images count: atoms 0.05 Å apart across a cell face are too close.

Where a radius graph is built, its neighbour list already holds every distance, so the rule
costs one ``min`` over the edges; elsewhere :func:`check_min_distance` runs vesin with
``cutoff=min_distance``, which finds (almost) no pairs and is cheap.

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
        calculator: a reusable half-list ``vesin.NeighborList`` with ``cutoff=min_distance``.

    Shapes:
        positions: ``(num_atoms, 3)``; cell: ``(3, 3)``; pbc: ``(3,)``.
    """
    if min_distance <= 0:
        return
    from matsciml.data.neighbors import vesin_inputs

    calculator = calculator or min_distance_calculator(min_distance)
    i, j, shifts, distances = calculator.compute(*vesin_inputs(positions, cell, pbc), quantities="ijSd", copy=False)
    refuse_close_pairs(i, j, shifts, distances, min_distance)


def min_distance_calculator(min_distance: float) -> vesin.NeighborList:
    """A half-list vesin neighbour list (each pair once) with ``cutoff=min_distance``, on one thread."""
    try:
        return vesin.NeighborList(cutoff=min_distance, full_list=False, n_threads=1)
    except TypeError:  # vesin 0.4 (torch < 2.3) has no n_threads and uses one thread
        return vesin.NeighborList(cutoff=min_distance, full_list=False)


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
