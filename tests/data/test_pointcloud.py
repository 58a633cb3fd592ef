"""Point clouds: S2EF keeps every atom, IS2RE samples the bulk reproducibly; padded with masks;
vectors between points go to the nearest periodic image."""

import numpy as np
import pytest
import torch
from ase.geometry import find_mic
from helpers.structures import slab_record

from matsciml.data import IS2REDataModule, S2EFDataModule
from matsciml.data.datasets import IS2REDataset, S2EFDataset
from matsciml.data.devsets import devset_path
from matsciml.data.pointcloud import PointCloudCollate, PointCloudSample, minimum_image_vectors


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


def test_sample_of_none_keeps_every_atom_and_bad_counts_are_refused():
    record = slab_record(0)
    assert PointCloudSample(num_subsurface=None)(dict(record)) is not None
    assert len(PointCloudSample(num_subsurface=None)(dict(record))["positions"]) == 13
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_subsurface must be an integer >= 0 or None"):
            PointCloudSample(num_subsurface=bad)


def test_s2ef_point_clouds_hold_every_atom_in_line_with_the_targets():
    # the energy and force targets of an S2EF record are the whole slab's
    dm = S2EFDataModule.from_devset(batch_size=4, representation="point_cloud", shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    records = [S2EFDataset(devset_path("s2ef", "train"))[index] for index in range(4)]
    assert batch.natoms.tolist() == [len(record["positions"]) for record in records]
    assert any((record["tags"] == 0).sum() > 8 for record in records), "the check needs a deep slab"
    for name in ("positions", "forces", "atomic_numbers"):
        assert torch.equal(batch[name], torch.as_tensor(np.concatenate([record[name] for record in records])))
    assert torch.equal(batch.energy, torch.as_tensor(np.stack([record["energy"] for record in records])))
    # cloud point m of structure b is atom ptr[b] + m: each atom's force target is its point's
    for b, n in enumerate(batch.natoms.tolist()):
        assert int(batch.point_mask[b].sum()) == n
        assert torch.equal(batch.point_index[b, :n], batch.ptr[b] + torch.arange(n))


def test_s2ef_refuses_sub_surface_sampling():
    dm = S2EFDataModule.from_devset(representation="point_cloud", num_subsurface=4)
    with pytest.raises(ValueError, match="S2EF targets are the energy and forces of every atom"):
        dm.setup("fit")


@pytest.mark.parametrize(("num_subsurface", "expected"), [(None, 8), (2, 2)])
def test_is2re_point_clouds_sample_the_bulk(num_subsurface, expected):
    dm = IS2REDataModule.from_devset(
        batch_size=4, representation="point_cloud", shuffle=False, num_subsurface=num_subsurface
    )
    batch = next(iter(dm.train_dataloader()))
    records = [IS2REDataset(devset_path("is2re", "train"))[index] for index in range(4)]
    for b, record in enumerate(records):
        tags = batch.tags[batch.ptr[b] : batch.ptr[b + 1]]
        assert int((tags > 0).sum()) == int((record["tags"] > 0).sum())
        assert int((tags == 0).sum()) == min(expected, int((record["tags"] == 0).sum()))
    assert (batch.natoms < torch.as_tensor([len(record["positions"]) for record in records])).all()


def test_minimum_image_vectors_wrap_periodic_directions_only():
    rng = np.random.default_rng(0)
    # hexagonal in plane, as an fcc(111) slab: rounding fractional coordinates alone misses
    # the nearest image of some pairs here
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 5.0 * np.sqrt(3) / 2, 0.0], [0.3, 0.2, 6.0]])
    points = rng.uniform(-3, 9, size=(20, 3))
    pbc = np.array([True, True, False])
    vectors = minimum_image_vectors(
        torch.as_tensor(points)[None], torch.as_tensor(cell)[None], torch.as_tensor(pbc)[None]
    )[0]
    raw = points[None, :, :] - points[:, None, :]
    expected, _ = find_mic(raw.reshape(-1, 3), cell, pbc)
    assert torch.allclose(vectors.reshape(-1, 3), torch.as_tensor(expected), atol=1e-12, rtol=0)
    assert torch.allclose(vectors[..., 2], torch.as_tensor(raw[..., 2]), atol=1e-12, rtol=0), "z is not periodic"
    # no periodic direction, and a cell of zeros (a molecule): plain differences
    for cell_, pbc_ in ((cell, np.zeros(3, bool)), (np.zeros((3, 3)), np.zeros(3, bool))):
        plain = minimum_image_vectors(
            torch.as_tensor(points)[None], torch.as_tensor(cell_)[None], torch.as_tensor(pbc_)[None]
        )[0]
        assert torch.allclose(plain, torch.as_tensor(raw), atol=1e-12, rtol=0)


def test_minimum_image_vectors_are_differentiable_in_the_cell():
    cell = torch.diag(torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64)).requires_grad_(True)
    points = torch.tensor([[[0.1, 0.0, 0.0], [2.9, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    vectors = minimum_image_vectors(points, cell[None], torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(vectors[0, 0, 1], torch.tensor([-0.2, 0.0, 0.0], dtype=torch.float64))
    vectors[0, 0, 1, 0].backward()  # x of (p1 - p0 - a): d/da_x = -1, d/dp1 = 1, d/dp0 = -1
    assert cell.grad[0, 0] == -1 and points.grad[0, 1, 0] == 1 and points.grad[0, 0, 0] == -1
