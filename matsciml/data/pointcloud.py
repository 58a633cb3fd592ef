"""Padded point clouds, the input of attention models such as Gala.

The pipeline is the graph pipeline with two changes:

* :class:`PointCloudSample`, a record transform, keeps the adsorbate (tag 2) and surface
  (tag 1) atoms plus a seeded random sample of sub-surface (tag 0) atoms;
* :class:`PointCloudCollate` batches those records as usual and adds padded views:
  ``point_index`` / ``point_mask`` ``(B, M)`` and one-hot ``point_features`` ``(B, M, S)``.

A model gathers ``positions[point_index]`` inside its forward pass, so forces flow back to
the atoms; padding slots point at atom 0 and are zeroed by ``point_mask``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from matsciml.data import keys as K
from matsciml.data.batch import Batch, collate

#: Default one-hot width: atomic numbers 1..100 map to slots 0..99.
DEFAULT_NUM_SPECIES = 100


class PointCloudSample:
    """Keep adsorbate and surface atoms and ``num_subsurface`` random sub-surface atoms.

    The sample depends only on ``seed`` and the structure (its ``sid``/``fid``, else its
    positions), so an epoch, a worker count or a restart never changes it. Structures
    without surface tags (all atoms tagged 0, e.g. molecules or bulk) keep every atom.

    Args:
        num_subsurface: sub-surface atoms to draw (all of them if fewer exist).
        seed: seed of the draw.
    """

    def __init__(self, num_subsurface: int = 8, seed: int = 0):
        if num_subsurface < 0:
            raise ValueError(f"num_subsurface must be >= 0, got {num_subsurface}")
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
        if not np.any(tags > 0):
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
