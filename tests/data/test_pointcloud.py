"""Point clouds keep adsorbate and surface atoms, sample the bulk reproducibly, pad with masks."""

import numpy as np
import torch
from helpers.structures import slab_record

from matsciml.data.pointcloud import PointCloudCollate, PointCloudSample


def test_sample_keeps_adsorbate_and_surface_and_draws_the_bulk_reproducibly():
    record = slab_record(0)  # 13 atoms: 8 sub-surface, 4 surface, 1 adsorbate
    sample = PointCloudSample(num_subsurface=3, seed=5)
    cloud = sample(dict(record))
    assert int(cloud["natoms"]) == 8 and len(cloud["positions"]) == 8
    assert (cloud["tags"] == 0).sum() == 3 and (cloud["tags"] == 2).sum() == 1 and (cloud["tags"] == 1).sum() == 4
    again = PointCloudSample(num_subsurface=3, seed=5)(dict(record))
    assert np.array_equal(again["positions"], cloud["positions"])
    other = PointCloudSample(num_subsurface=3, seed=6)(dict(record))
    assert not np.array_equal(other["positions"], cloud["positions"])
    # forces travel with their atoms
    kept = [np.flatnonzero((record["positions"] == p).all(axis=1))[0] for p in cloud["positions"]]
    assert np.array_equal(record["forces"][kept], cloud["forces"])


def test_untagged_structures_keep_every_atom():
    record = slab_record(1)
    record["tags"] = np.zeros_like(record["tags"])
    assert len(PointCloudSample(num_subsurface=2)(dict(record))["positions"]) == 13


def test_collate_pads_with_masks_and_one_hot_features():
    records = [PointCloudSample(num_subsurface=n)(slab_record(n)) for n in (1, 4)]
    batch = PointCloudCollate(num_species=100)(records)
    assert batch.point_index.shape == (2, 9) and batch.point_features.shape == (2, 9, 100)
    assert batch.point_mask.sum(dim=1).tolist() == [6, 9]
    assert not batch.point_features[0, 6:].any(), "padding must be zero"
    gathered = batch.positions[batch.point_index]
    assert torch.equal(gathered[1], batch.positions[6:15])
    numbers = batch.atomic_numbers[batch.point_index[batch.point_mask]]
    assert torch.equal(batch.point_features[batch.point_mask].argmax(-1) + 1, numbers)


def test_forces_flow_back_through_the_padded_gather():
    batch = PointCloudCollate()([PointCloudSample(2)(slab_record(0)), PointCloudSample(2)(slab_record(1))])
    positions = batch.positions.clone().requires_grad_(True)
    cloud = positions[batch.point_index] * batch.point_mask.unsqueeze(-1)
    cloud.pow(2).sum().backward()
    assert torch.allclose(positions.grad, 2 * positions.detach())
