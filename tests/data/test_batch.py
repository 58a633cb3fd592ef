"""Collation is driven by the field declaration; the batch moves, pins and prints."""

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from helpers.structures import slab_record

from matsciml.data import keys as K
from matsciml.data.batch import Batch, collate
from matsciml.data.neighbors import RadiusGraph


@pytest.fixture
def records():
    graph = RadiusGraph(cutoff=4.0)
    return [graph(slab_record(seed)) for seed in range(3)]


def test_atom_edge_and_structure_fields_are_combined_by_level(records):
    batch = collate(records)
    natoms = [int(r["natoms"]) for r in records]
    assert batch.num_structures == 3 and batch.num_atoms == sum(natoms)
    assert batch.positions.shape == (sum(natoms), 3) and batch.positions.dtype == torch.float32
    assert batch.cell.shape == (3, 3, 3) and batch.energy.shape == (3,) and batch.pbc.dtype == torch.bool
    assert torch.equal(batch.ptr, torch.tensor([0, natoms[0], natoms[0] + natoms[1], sum(natoms)]))
    assert torch.equal(batch.structure_index, torch.repeat_interleave(torch.arange(3), torch.tensor(natoms)))
    for b, record in enumerate(records):
        atoms = slice(int(batch.ptr[b]), int(batch.ptr[b + 1]))
        assert np.array_equal(batch.forces[atoms].numpy(), record["forces"])
        assert float(batch.energy[b]) == pytest.approx(float(record["energy"]))


def test_edge_index_is_offset_per_structure_and_edge_vectors_are_recoverable(records):
    batch = collate(records)
    assert batch.num_edges == sum(r["edge_index"].shape[1] for r in records)
    j, i = batch.edge_index
    # every edge stays inside its structure
    assert torch.equal(batch.structure_index[i], batch.structure_index[j])
    cell = batch.cell[batch.structure_index[i]]
    vectors = batch.positions[j] - batch.positions[i] + torch.einsum("ek,ekl->el", batch.cell_shifts.float(), cell)
    assert float(vectors.norm(dim=1).max()) <= 4.0 + 1e-5


def test_absent_declared_fields_read_as_none_and_undeclared_names_fail(records):
    batch = collate(records)
    assert batch.stress is None and "stress" not in batch
    with pytest.raises(AttributeError):
        batch.not_a_field  # noqa: B018
    with pytest.raises(KeyError, match="undeclared batch field"):
        Batch(positions=torch.zeros(1, 3), distances=torch.zeros(1))


def test_records_with_different_fields_are_refused(records):
    del records[1]["forces"]
    with pytest.raises(ValueError, match=r"disagree on field\(s\) \['forces'\]"):
        collate(records)
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_to_casts_only_floating_fields_and_pin_memory_keeps_values(records):
    batch = collate(records)
    double = batch.to("cpu", dtype=torch.float64)
    assert double.positions.dtype == torch.float64 and double.edge_index.dtype == torch.int64
    assert double.fixed.dtype == torch.bool
    if torch.cuda.is_available():  # pinning needs an accelerator runtime
        assert batch.pin_memory().positions.is_pinned()


def test_repr_lists_every_field_with_shape_and_units(records):
    text = repr(collate(records))
    assert text.startswith("Batch(num_structures=3")
    for name in ("positions", "forces", "edge_index", "cell_shifts", "energy", "ptr"):
        assert name in text
    assert "eV/Å" in text and "[3, 3, 3]" in text


def test_every_declared_field_is_documented():
    for field in K.FIELDS.values():
        assert field.doc and getattr(Batch, field.name).__doc__.startswith(field.doc)


def test_batch_pickles_to_equal_tensors_and_keeps_autograd_tensors_as_tensors(records):
    import pickle

    batch = collate(records)
    clone = pickle.loads(pickle.dumps(batch))
    assert set(clone.keys()) == set(batch.keys())
    for name, value in batch.items():
        assert clone[name].dtype == value.dtype and torch.equal(clone[name], value)
    clone.positions.add_(1.0)  # writable, and no longer shares memory with the original
    assert not torch.equal(clone.positions, batch.positions)
    grad = batch.replace(positions=batch.positions.clone().requires_grad_(True))
    assert pickle.loads(pickle.dumps(grad)).positions.requires_grad


def test_lightning_converts_and_moves_a_batch_as_a_mapping(records):
    # the Trainer's precision="64-true" casts inputs with apply_to_collection, which rebuilds Mappings
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning.pytorch.plugins.precision import DoublePrecision

    batch = collate(records)
    assert isinstance(batch, Mapping) and len(batch) == len(list(batch.keys())) and set(batch) == set(batch.keys())
    (converted,), kwargs = DoublePrecision().convert_input(((batch,), {}))
    assert type(converted) is Batch and kwargs == {} and set(converted) == set(batch)
    for name, value in batch.items():
        expected = torch.float64 if value.is_floating_point() else value.dtype
        assert converted[name].dtype == expected and torch.equal(converted[name], value.to(expected)), name
    moved = move_data_to_device([batch], torch.device("cpu"))[0]
    assert type(moved) is Batch and all(torch.equal(moved[k], v) for k, v in batch.items())
    # equality and hashing stay by identity: Mapping's content comparison is ambiguous for tensors
    assert batch == batch and batch != collate(records) and {batch: 1}[batch] == 1
