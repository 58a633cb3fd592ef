"""DGL and PyG batches through the one adapter: exact conversions, same physics, same training.

Each test runs once per backend; the DGL cases are marked ``requires_dgl`` (run them with
``make test-dgl``: DGL 2.1 imports only with torch <= 2.2.1) and the PyG cases ``requires_pyg``.
Where the library is missing they are skipped with the reason, never silently absent.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers.physics import molecule_like, slab, small_bulk
from helpers.structures import slab_record
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data import keys as K
from matsciml.data.backends import as_batch, backend_of
from matsciml.data.batch import Batch, collate
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.data.neighbors import RadiusGraph
from matsciml.data.structures import batch_from_atoms
from matsciml.models import EGNN
from matsciml.models.megnet import MegNet
from matsciml.tasks import IS2RETask, S2EFTask

BACKENDS = [
    pytest.param("dgl", marks=pytest.mark.requires_dgl, id="dgl"),
    pytest.param("pyg", marks=pytest.mark.requires_pyg, id="pyg"),
]
_MODULES = {"dgl": "dgl", "pyg": "torch_geometric.data"}
_REASONS = {
    "dgl": "DGL is not installed here (it needs torch <= 2.2.1: run `make test-dgl`)",
    "pyg": "torch_geometric is not installed here (the main test env checks OC20 reads without PyG)",
}


@pytest.fixture(params=BACKENDS)
def backend(request):
    pytest.importorskip(_MODULES[request.param], reason=_REASONS[request.param])
    return request.param


def convert(batch: Batch, backend: str):
    from matsciml.data import backends

    return backends.to_dgl(batch) if backend == "dgl" else backends.to_pyg(batch)


def s2ef_batch(num: int = 3) -> Batch:
    graph = RadiusGraph(6.0, 12)
    return collate([graph(slab_record(seed, task="s2ef")) for seed in range(num)])


def assert_same(a: Batch, b: Batch) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for name, value in a.items():
        assert b[name].dtype == value.dtype, name
        assert b[name].shape == value.shape, name
        assert torch.equal(b[name], value), name


def test_round_trip_is_exact_and_shares_tensors(backend):
    batch = s2ef_batch()
    converted = convert(batch, backend)
    assert backend_of(converted) == backend
    back = as_batch(converted)
    assert_same(batch, back)
    for name in (K.POSITIONS, K.FORCES, K.CELL_SHIFTS, K.ATOMIC_NUMBERS):
        assert back[name] is batch[name], f"{name} was copied"


def test_per_structure_split_and_rebatch_is_exact(backend):
    """dgl.unbatch/dgl.batch and PyG's to_data_list/from_data_list keep every field."""
    batch = s2ef_batch()
    converted = convert(batch, backend)
    if backend == "dgl":
        import dgl

        parts = dgl.unbatch(converted)
        assert [p.num_nodes() for p in parts] == batch.natoms.tolist()
        single = as_batch(parts[1])
        rebatched = dgl.batch(parts)
    else:
        from torch_geometric.data import Batch as PyGBatch

        parts = converted.to_data_list()
        single = as_batch(PyGBatch.from_data_list([parts[1]]))
        rebatched = PyGBatch.from_data_list(parts)
    assert_same(batch, as_batch(rebatched))
    start, stop = batch.ptr[1].item(), batch.ptr[2].item()
    assert torch.equal(single.positions, batch.positions[start:stop])
    assert torch.equal(single.energy, batch.energy[1:2]) and torch.equal(single.cell, batch.cell[1:2])
    assert single.num_edges == int((batch.structure_index[batch.edge_index[1]] == 1).sum())


def test_pickles_for_dataloader_workers(backend):
    batch = s2ef_batch(2)
    assert_same(batch, as_batch(pickle.loads(pickle.dumps(convert(batch, backend)))))


def test_point_clouds_are_refused(backend):
    from matsciml.data.pointcloud import PointCloudCollate, PointCloudSample

    records = [PointCloudSample(4, 0)(slab_record(seed)) for seed in range(2)]
    with pytest.raises(ValueError, match="point-cloud"):
        convert(PointCloudCollate()(records), backend)


def small_egnn() -> EGNN:
    return EGNN(
        hidden=16,
        num_layers=2,
        edge_sizes=(16,),
        node_sizes=(16,),
        projection_hidden=16,
        output_hidden=16,
        num_radial=8,
        cutoff=5.0,
    )


def small_megnet() -> MegNet:
    return MegNet(
        cutoff=5.0,
        num_blocks=2,
        dense_sizes=(16, 8),
        conv_sizes=(16, 16, 8),
        num_gaussians=16,
        set2set_layers=1,
        set2set_steps=2,
        output_sizes=(8, 8),
    )


@pytest.mark.parametrize("make_model", [small_egnn, small_megnet], ids=["egnn", "megnet"])
def test_models_give_the_same_energies_and_forces(backend, make_model):
    torch.manual_seed(0)
    model = make_model().double().eval()
    batch = batch_from_atoms(
        [slab(), small_bulk(), molecule_like()], cutoff=5.0, max_neighbors=None, dtype=torch.float64
    )

    def energy_and_forces(make_input):
        positions = batch.positions.detach().clone().requires_grad_(True)
        energy = model(make_input(batch.replace(positions=positions)))
        (gradient,) = torch.autograd.grad(energy.sum(), positions)
        return energy.detach(), -gradient

    energy, forces = energy_and_forces(lambda b: b)
    # the gradient is taken with respect to the native positions tensor, which the converted
    # batch must share: forces of a DGL/PyG batch are -dE/d(its own positions)
    energy_b, forces_b = energy_and_forces(lambda b: convert(b, backend))
    assert energy.dtype == energy_b.dtype == torch.float64
    torch.testing.assert_close(energy_b, energy, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(forces_b, forces, atol=1e-10, rtol=1e-10)
    assert forces.abs().max() > 1e-6  # the comparison is not between zeros


def test_task_step_and_predict_accept_the_batch(backend):
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), statistics=None, normalize=False)
    batch = s2ef_batch(2)
    loss, metrics = task.step(batch)
    loss_b, metrics_b = task.step(convert(batch, backend))
    torch.testing.assert_close(loss_b, loss)
    assert metrics_b.keys() == metrics.keys()
    out, out_b = task.predict_step(batch, 0), task.predict_step(convert(batch, backend), 0)
    torch.testing.assert_close(out_b["energy"], out["energy"])
    torch.testing.assert_close(torch.cat(out_b["forces"]), torch.cat(out["forces"]))
    assert torch.equal(out_b["sid"], batch.sid)


@pytest.mark.parametrize("module", [S2EFDataModule, IS2REDataModule], ids=["s2ef", "is2re"])
def test_datamodule_yields_the_backend_and_trains(backend, module, tmp_path):
    data = module.from_devset(batch_size=4, graph_backend=backend)
    loaded = next(iter(data.train_dataloader()))
    assert backend_of(loaded) == backend
    assert as_batch(loaded).num_structures == 4
    torch.manual_seed(0)
    task = (S2EFTask if module is S2EFDataModule else IS2RETask)(tiny_egnn())
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_backend_batches_cross_worker_processes(backend):
    data = S2EFDataModule.from_devset(batch_size=3, num_workers=1, graph_backend=backend)
    native = S2EFDataModule.from_devset(batch_size=3, shuffle=False)
    data.shuffle = False
    assert_same(next(iter(native.train_dataloader())), as_batch(next(iter(data.train_dataloader()))))
