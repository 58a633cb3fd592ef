"""Padded point clouds, the input of attention models such as Gala.

The pipeline is the graph pipeline with two changes:

* for IS2RE only, :class:`PointCloudSample`, a record transform, keeps the adsorbate (tag 2)
  and surface (tag 1) atoms plus a seeded random sample of sub-surface (tag 0) atoms, as in
  the paper. S2EF clouds hold every atom: their targets are the whole structure's energy and
  forces, which a model can only predict from the whole structure;
* :class:`PointCloudCollate` batches those records as usual and adds padded views:
  ``point_index`` / ``point_mask`` ``(B, M)`` and one-hot ``point_features`` ``(B, M, S)``.

A model gathers ``positions[point_index]`` inside its forward pass, so forces flow back to
the atoms; padding slots point at atom 0 and are zeroed by ``point_mask``. It then takes the
vectors between points with :func:`minimum_image_vectors`, also inside the forward pass, so
the periodic cell is seen by the energy, the forces and the stress.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from matsciml.data import keys as K
from matsciml.data.batch import Batch, collate

#: Default one-hot width: atomic numbers 1..100 map to slots 0..99.
DEFAULT_NUM_SPECIES = 100
#: Sub-surface atoms an IS2RE point cloud samples unless told otherwise (the paper's setting).
DEFAULT_NUM_SUBSURFACE = 8


class PointCloudSample:
    """Keep adsorbate and surface atoms and ``num_subsurface`` random sub-surface atoms.

    This is the paper's IS2RE point cloud: the relaxed adsorption energy is a property of the
    adsorbate and the surface, so the bulk below may be sampled. The atoms left out are gone
    from the record (positions, forces, ...), while a per-structure target such as the total
    energy of an S2EF slab would still count them: do not sample S2EF clouds (the data modules
    do not; :class:`~matsciml.data.datamodules.S2EFDataModule` keeps every atom).

    The sample depends only on ``seed`` and the structure (its ``sid``/``fid``, else its
    positions), so an epoch, a worker count or a restart never changes it. Structures
    without surface tags (all atoms tagged 0, e.g. molecules or bulk) keep every atom.

    Args:
        num_subsurface: sub-surface atoms to draw (all of them if fewer exist); ``None``
            keeps every atom.
        seed: seed of the draw.
    """

    def __init__(self, num_subsurface: int | None = DEFAULT_NUM_SUBSURFACE, seed: int = 0):
        if num_subsurface is not None and (
            isinstance(num_subsurface, bool) or not isinstance(num_subsurface, int | np.integer) or num_subsurface < 0
        ):
            raise ValueError(f"num_subsurface must be an integer >= 0 or None (every atom), got {num_subsurface!r}")
        self.num_subsurface = num_subsurface
        self.seed = seed

    def _rng(self, record: Mapping[str, np.ndarray]) -> np.random.Generator:
        if K.SID in record:
            key = [int(record[K.SID]) & 0xFFFFFFFF, int(record.get(K.FID, 0)) & 0xFFFFFFFF]
        else:
            key = [zlib.crc32(np.ascontiguousarray(record[K.POSITIONS]).tobytes())]
        return np.random.default_rng([self.seed, *key])

    def __call__(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tags = record[K.TAGS]
        if self.num_subsurface is None or not np.any(tags > 0):
            return record
        top = np.flatnonzero(tags > 0)
        below = np.flatnonzero(tags == 0)
        if len(below) > self.num_subsurface:
            below = np.sort(self._rng(record).choice(below, size=self.num_subsurface, replace=False))
        keep = np.sort(np.concatenate([top, below]))
        out = dict(record)
        for name, value in record.items():
            if K.FIELDS[name].level == "atom":
                out[name] = value[keep]
        out[K.NATOMS] = np.asarray(len(keep), dtype=np.int64)
        return out

    def __repr__(self) -> str:
        return f"PointCloudSample(num_subsurface={self.num_subsurface}, seed={self.seed})"


class PointCloudCollate:
    """Collate records into a :class:`Batch` with padded point-cloud views.

    Args:
        num_species: one-hot width; atomic number ``Z`` maps to slot ``Z - 1``.
    """

    def __init__(self, num_species: int = DEFAULT_NUM_SPECIES):
        self.num_species = num_species

    def __call__(self, records: Sequence[Mapping[str, np.ndarray]]) -> Batch:
        batch = collate(records)
        natoms, ptr = batch.natoms, batch.ptr
        max_points = int(natoms.max())
        slots = torch.arange(max_points)
        mask = slots.unsqueeze(0) < natoms.unsqueeze(1)
        index = torch.where(mask, ptr[:-1].unsqueeze(1) + slots.unsqueeze(0), torch.zeros((), dtype=torch.long))
        numbers = batch.atomic_numbers
        if int(numbers.max()) > self.num_species:
            raise ValueError(f"atomic number {int(numbers.max())} exceeds num_species={self.num_species}")
        features = torch.nn.functional.one_hot(numbers[index] - 1, self.num_species).to(torch.float32)
        features = features * mask.unsqueeze(-1)
        return batch.replace(point_index=index, point_mask=mask, point_features=features)

    def __repr__(self) -> str:
        return f"PointCloudCollate(num_species={self.num_species})"


def minimum_image_vectors(points: torch.Tensor, cell: torch.Tensor | None, pbc: torch.Tensor | None) -> torch.Tensor:
    """Vectors from every point ``i`` to every point ``j`` of a cloud, to ``j``'s nearest image.

    ``vectors[b, i, j] = points[b, j] - points[b, i] + shift @ cell[b]``. The integer ``shift``
    is chosen without gradient, along periodic directions only (zero along the others): the
    pair's fractional coordinates are rounded, then the shortest of the 27 images around that
    shift is taken (rounding alone misses the nearest image in skewed, e.g. hexagonal, cells).
    The sum is then differentiable in ``points`` and ``cell``, so autograd forces and stress
    follow the image each pair uses. Moving an atom by a lattice vector, or wrapping the
    structure into its cell, leaves every vector unchanged.

    The search is exact for near-orthogonal and hexagonal cells (OC20's); reduce strongly
    skewed cells first (``ase.geometry.minkowski_reduce``). A pair equidistant from two images
    (half a cell apart along an orthogonal lattice vector) switches image discontinuously.
    Cells with zero rows (e.g. molecules) are handled through the pseudo-inverse.

    Args:
        points: cloud positions, padding slots included.
        cell: lattice vectors as rows; ``None`` for no cell (plain differences).
        pbc: periodic along each lattice vector; ``None`` means not periodic.

    Shapes:
        points ``(B, M, 3)``, cell ``(B, 3, 3)``, pbc ``(B, 3)``; returns ``(B, M, M, 3)``.
    """
    vectors = points.unsqueeze(1) - points.unsqueeze(2)
    if cell is None or pbc is None:
        return vectors
    cell = cell.to(points.dtype).unsqueeze(1)  # (B, 1, 3, 3)
    with torch.no_grad():
        # the search runs in at least float32 (pinv has no half-precision kernels)
        dtype = torch.promote_types(points.dtype, torch.float32)
        search, lattice = vectors.to(dtype), cell.to(dtype)
        periodic = pbc.to(dtype)[:, None, None, :]  # (B, 1, 1, 3)
        rounded = -torch.round(search @ torch.linalg.pinv(lattice)) * periodic  # (B, M, M, 3)
        around = _NEIGHBOUR_SHIFTS.to(points.device, dtype) * periodic.unsqueeze(-2)  # (B, 1, 1, 27, 3)
        candidates = rounded.unsqueeze(-2) + around  # (B, M, M, 27, 3)
        lengths = (search.unsqueeze(-2) + candidates @ lattice.unsqueeze(1)).square().sum(dim=-1)
        best = lengths.argmin(dim=-1)[..., None, None].expand(*lengths.shape[:-1], 1, 3)
        shift = candidates.gather(-2, best).squeeze(-2).to(points.dtype)
    return vectors + shift @ cell


#: The 27 integer shifts ``{-1, 0, 1}^3`` around a rounded image.
_NEIGHBOUR_SHIFTS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)))
