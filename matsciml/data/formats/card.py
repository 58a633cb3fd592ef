"""Running statistics that make up a dataset's metadata card.

Accumulated one record at a time while writing, so a card costs no extra pass over the
data. Sums are kept in float64 to stay exact enough over millions of records.

Force statistics cover the free atoms only (fixed ones are left out of the loss too) and say
so with ``free_atoms_only``; total energies also accumulate the composition sums of
:mod:`matsciml.data.composition` (``energy_composition``), from which element references are
fitted and reference-subtracted statistics computed. Cards written before either existed are
*stale*: :func:`stale_statistics` says why, and readers recompute them (one pass).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from matsciml.data import keys as K
from matsciml.data.composition import CompositionMoments

#: Card key of the composition sums of total energies.
COMPOSITION = "energy_composition"


class _Moments:
    """Count, mean, std, min and max of a stream of numbers."""

    def __init__(self) -> None:
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        self.count += values.size
        self.total += float(values.sum())
        self.total_sq += float(np.square(values).sum())
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))

    def summary(self) -> dict:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return {"count": self.count, "mean": mean, "std": var**0.5, "min": self.low, "max": self.high}


class DatasetStatistics:
    """Element counts, natoms histogram and target statistics of a dataset."""

    _ENERGIES = (K.ENERGY, K.INITIAL_ENERGY, K.RELAXED_ENERGY)

    def __init__(self, task: str):
        self.task = task
        self.num_records = 0
        self.num_atoms = 0
        self.elements: Counter[int] = Counter()
        self.natoms: Counter[int] = Counter()
        self.energy = {name: _Moments() for name in self._ENERGIES}
        self.energy_per_atom = {name: _Moments() for name in self._ENERGIES}
        self.force_components = _Moments()
        self.force_norms = _Moments()
        self.fixed_atoms = 0
        self.composition = {"per_atom": CompositionMoments(), "total": CompositionMoments()}

    def add(self, record: dict[str, np.ndarray]) -> None:
        natoms = int(record[K.NATOMS])
        self.num_records += 1
        self.num_atoms += natoms
        self.natoms[natoms] += 1
        numbers, counts = np.unique(record[K.ATOMIC_NUMBERS], return_counts=True)
        composition = dict(zip(numbers.tolist(), counts.tolist(), strict=True))
        self.elements.update(composition)
        for name in self._ENERGIES:
            if name in record:
                self.energy[name].add(record[name])
                self.energy_per_atom[name].add(record[name] / natoms)
        if K.ENERGY in record:
            energy = float(np.asarray(record[K.ENERGY]).reshape(()))
            self.composition["total"].add(composition, energy)
            self.composition["per_atom"].add({z: c / natoms for z, c in composition.items()}, energy / natoms)
        free = ~np.asarray(record[K.FIXED], dtype=bool) if K.FIXED in record else slice(None)
        if K.FORCES in record:
            forces = np.asarray(record[K.FORCES])[free]
            self.force_components.add(forces)
            self.force_norms.add(np.linalg.norm(forces, axis=1))
        if K.FIXED in record:
            self.fixed_atoms += int(record[K.FIXED].sum())

    def summary(self) -> dict:
        targets = {}
        for name in self._ENERGIES:
            if self.energy[name].count:
                targets[name] = self.energy[name].summary()
                targets[f"{name}_per_atom"] = self.energy_per_atom[name].summary()
        if self.force_components.count:
            targets[K.FORCES] = {
                "components": self.force_components.summary(),
                "norms": self.force_norms.summary(),
                "free_atoms_only": True,
            }
        if self.composition["total"].count:
            targets[COMPOSITION] = {kind: sums.summary() for kind, sums in self.composition.items()}
        return {
            "num_atoms": self.num_atoms,
            "num_fixed_atoms": self.fixed_atoms,
            "elements": {str(z): n for z, n in sorted(self.elements.items())},
            "natoms_histogram": {str(n): c for n, c in sorted(self.natoms.items())},
            "statistics": targets,
        }


def stale_statistics(card: dict) -> list[str]:
    """Why a card's statistics are out of date (empty when current): cards written before the
    composition sums existed lack them, and ones whose force statistics included fixed atoms
    (the shipped devsets' cards, written so) would scale forces by the wrong std."""
    statistics, reasons = card.get("statistics", {}), []
    if K.ENERGY in statistics and COMPOSITION not in statistics:
        reasons.append("no composition sums for element references")
    forces = statistics.get(K.FORCES)
    if forces is not None and not forces.get("free_atoms_only") and card.get("num_fixed_atoms", 0):
        reasons.append("force statistics include fixed atoms")
    return reasons
