"""examples/dgl_model.py: a DGL message-passing model gives exact forces and trains through S2EFTask."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.requires_dgl
pytest.importorskip("dgl", reason="DGL is not installed here (it needs torch <= 2.2.1: run `make test-dgl`)")

from helpers.physics import molecule_like, slab, small_bulk  # noqa: E402

from matsciml.data.backends import to_dgl  # noqa: E402
from matsciml.data.structures import batch_from_atoms  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dgl_model.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dgl_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model(example):
    torch.manual_seed(0)
    return example.DGLEnergyModel(hidden=8, num_layers=2, num_radial=6, cutoff=4.0).double().eval()


def test_forces_are_minus_the_energy_gradient(model):
    batch = batch_from_atoms([small_bulk(), molecule_like()], cutoff=4.0, max_neighbors=None, dtype=torch.float64)
    positions = batch.positions.detach().clone().requires_grad_(True)
    energy = model(to_dgl(batch.replace(positions=positions)))  # a DGL graph in, too
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    forces = -gradient
    step = 1e-5
    for atom, axis in [(0, 0), (1, 2), (5, 1)]:
        shifted = []
        for sign in (1, -1):
            moved = batch.positions.clone()
            moved[atom, axis] += sign * step
            shifted.append(model(batch.replace(positions=moved)).sum())
        numeric = -(shifted[0] - shifted[1]) / (2 * step)
        assert abs(float(numeric) - float(forces[atom, axis])) < 1e-6 * max(1.0, abs(float(numeric)))
    assert forces.abs().max() > 1e-4


def test_same_energies_from_native_and_dgl_batches(model):
    batch = batch_from_atoms([slab(), small_bulk()], cutoff=4.0, max_neighbors=None, dtype=torch.float64)
    torch.testing.assert_close(model(to_dgl(batch)), model(batch), atol=1e-12, rtol=1e-12)


def test_a_short_training_run_lowers_the_loss(example, tmp_path):
    from matsciml.data import S2EFDGLDataModule
    from matsciml.data.backends import as_batch

    data = S2EFDGLDataModule.from_devset(batch_size=8, shuffle=False)
    graphs = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    task, trainer, _ = example.train(
        max_steps=25, batch_size=4, lr=5e-3, default_root_dir=tmp_path, enable_progress_bar=False, limit_val_batches=0
    )
    trained = task.model.state_dict()
    torch.manual_seed(0)
    fresh = type(task)(example.DGLEnergyModel(hidden=16, num_layers=2, num_radial=8, cutoff=data.cutoff))
    fresh.fit_normalizer(data.target_statistics)
    before = fresh.step(graphs)[0].item()
    fresh.model.load_state_dict(trained)
    after = fresh.step(as_batch(graphs))[0].item()
    assert after < before, (before, after)
