"""Per-element reference energies by least squares over composition, without a second pass.

A structure's energy is fitted as ``E ≈ sum_Z count_Z * ref_Z``. The fit needs only the normal
equations ``sum x x^T`` and ``sum x t`` of the rows ``x`` (element counts) and targets ``t``;
with ``sum t``, ``sum t^2`` and ``sum x`` they also give the mean and std of the residual
``t - x . ref`` for *any* references, so cards accumulate them while a dataset is written and
the normaliser's statistics of reference-subtracted energies cost nothing at training time.

Two weightings are kept: ``per_atom`` rows (``x = counts / natoms``, ``t = E / natoms``), the
ones the fit uses (the energy loss is per atom, and the residual per atom then has zero mean
because the fractions sum to one), and ``total`` rows (``x = counts``, ``t = E``) for residual
statistics of total energies.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np


class CompositionMoments:
    """Running sums of a linear fit ``target ≈ features . references`` over element features."""

    def __init__(self) -> None:
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.xx: defaultdict[tuple[int, int], float] = defaultdict(float)
        self.xt: defaultdict[int, float] = defaultdict(float)
        self.x: defaultdict[int, float] = defaultdict(float)

    def add(self, features: Mapping[int, float], target: float) -> None:
        """One row: ``features`` maps atomic number to its count (or fraction)."""
        self.count += 1
        self.total += target
        self.total_sq += target * target
        items = sorted(features.items())
        for z, value in items:
            self.x[z] += value
            self.xt[z] += value * target
            for w, other in items:
                if w >= z:
                    self.xx[(z, w)] += value * other

    def summary(self) -> dict:
        """Plain data for a JSON card (the upper triangle of ``x x^T`` stored as a full matrix)."""
        elements = sorted(self.x)
        index = {z: i for i, z in enumerate(elements)}
        matrix = np.zeros((len(elements), len(elements)))
        for (z, w), value in self.xx.items():
            matrix[index[z], index[w]] = matrix[index[w], index[z]] = value
        return {
            "count": self.count,
            "elements": elements,
            "xx": matrix.tolist(),
            "xt": [self.xt[z] for z in elements],
            "x": [self.x[z] for z in elements],
            "t": self.total,
            "tt": self.total_sq,
        }


def fit_references(summary: Mapping) -> dict[int, float]:
    """Least-squares reference energy per element (eV), from a card's composition sums.

    The fit is of energies per atom, ``E / natoms ≈ shift + sum_Z fraction_Z * ref_Z``. As the
    fractions sum to one, the shift and a common offset of the references are the same degree
    of freedom; of the equally good solutions this takes the references of least atom-weighted
    norm ``sum_Z N_Z ref_Z^2``, so the shift (the residual mean, which the normaliser takes) is
    the typical energy per atom, and an element missing from the training data - reference
    zero - gets it rather than no energy at all. Elements that never vary independently make
    the equations singular; the least-norm solution then gives those directions nothing. As
    the centred sums are differences of large numbers, directions whose variance is at the
    level of rounding (every record of one composition: the whole matrix) count as singular
    too, judged against the uncentred sums, so that rounding noise is not fitted as references.
    """
    rows = summary["per_atom"]
    count = rows["count"]
    if not count:
        raise ValueError("no energies were accumulated: cannot fit element references")
    x_mean, t_mean = np.asarray(rows["x"]) / count, rows["t"] / count
    # centred normal equations: the free per-atom shift is eliminated
    cxx = np.asarray(rows["xx"]) - count * np.outer(x_mean, x_mean)
    cxt = np.asarray(rows["xt"]) - count * x_mean * t_mean
    atoms = dict(zip(summary["total"]["elements"], summary["total"]["x"], strict=True))
    root = np.sqrt(np.asarray([atoms[z] for z in rows["elements"]]) / sum(atoms.values()))
    scaled = cxx / np.outer(root, root)
    eigenvalues, vectors = np.linalg.eigh((scaled + scaled.T) / 2)
    # relative to the uncentred second moments: what centring leaves below this is rounding
    noise = 1e-9 * np.linalg.eigvalsh(np.asarray(rows["xx"]) / np.outer(root, root)).max()
    kept = vectors[:, eigenvalues > noise]
    solution = kept @ ((kept.T @ (cxt / root)) / eigenvalues[eigenvalues > noise]) / root
    return {int(z): float(r) for z, r in zip(rows["elements"], solution, strict=True)}


def residual_moments(rows: Mapping, references: Mapping[int, float]) -> dict:
    """Mean and std of ``t - x . references`` over the accumulated rows (one weighting's sums)."""
    count = rows["count"]
    ref = np.asarray([float(references.get(int(z), 0.0)) for z in rows["elements"]])
    mean = (rows["t"] - ref @ np.asarray(rows["x"])) / count
    square = (rows["tt"] - 2 * ref @ np.asarray(rows["xt"]) + ref @ np.asarray(rows["xx"]) @ ref) / count
    return {"count": count, "mean": float(mean), "std": float(max(square - mean * mean, 0.0) ** 0.5)}
