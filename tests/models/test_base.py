"""AbstractEnergyModel: periodic edge vectors, per-structure sums, clear errors (REFERENCE.md §3)."""

import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list
from helpers.physics import slab, small_bulk

from matsciml.data import keys as K
from matsciml.data.pointcloud import PointCloudCollate, PointCloudSample
from matsciml.data.structures import atoms_record, batch_from_atoms
from matsciml.models import AbstractEnergyModel


class PairSum(AbstractEnergyModel):
    """A minimal subclass: half the sum over edges of exp(-r)."""

    def energy(self, batch):
        distances = self.edge_vectors(batch).norm(dim=-1)
        j, i = batch.edge_index
        per_atom = torch.zeros_like(batch.positions[:, 0]).index_add(0, i, 0.5 * torch.exp(-distances))
        return self.sum_per_structure(per_atom, batch)


class SumsOverTheBatch(PairSum):
    def energy(self, batch):
        return super().energy(batch).sum()  # the classic bug: one number for the whole batch


def test_edge_vectors_include_the_periodic_offsets():
    # pitfall: edge vectors without the cell offset; in this cell every neighbour is an image
    atoms = small_bulk()
    batch = batch_from_atoms(atoms, cutoff=5.0, max_neighbors=None, dtype=torch.float64)
    vectors = AbstractEnergyModel.edge_vectors(batch).numpy()
    i, j, expected = neighbor_list("ijD", atoms, 5.0)
    ours = {
        (int(a), int(b), *np.round(v, 8))
        for a, b, v in zip(batch.edge_index[1], batch.edge_index[0], vectors, strict=True)
    }
    ase = {(int(a), int(b), *np.round(v, 8)) for a, b, v in zip(i, j, expected, strict=True)}
    assert ours == ase
    without_offsets = batch.positions[batch.edge_index[0]] - batch.positions[batch.edge_index[1]]
    assert float(without_offsets.norm(dim=1).max()) < 4.0  # the same edges would look very different


def test_distances_are_never_stored_so_forces_see_the_geometry():
    assert "distances" not in K.FIELDS
    batch = batch_from_atoms(slab(), cutoff=5.0, dtype=torch.float64)
    positions = batch.positions.clone().requires_grad_(True)
    PairSum()(batch.replace(positions=positions)).sum().backward()
    assert positions.grad.abs().sum() > 0


def test_energies_are_per_structure_not_per_batch():
    batch = batch_from_atoms([slab(), small_bulk()], cutoff=5.0, dtype=torch.float64)
    energies = PairSum()(batch)
    alone = [PairSum()(batch_from_atoms(a, cutoff=5.0, dtype=torch.float64)) for a in (slab(), small_bulk())]
    assert energies.shape == (2,) and torch.allclose(energies, torch.cat(alone))
    with pytest.raises(ValueError, match=r"returned shape \(\); expected \(2,\), one energy per structure"):
        SumsOverTheBatch()(batch)


def test_the_wrong_representation_is_named():
    cloud = PointCloudCollate()([PointCloudSample(2)(atoms_record(slab()))])
    with pytest.raises(ValueError, match="PairSum needs a graph batch"):
        PairSum()(cloud)


def test_cosine_cutoff_is_smooth_and_vanishes_at_the_cutoff():
    r = torch.linspace(0, 6, 601, dtype=torch.float64, requires_grad=True)
    envelope = AbstractEnergyModel.cosine_cutoff(r, 5.0)
    (slope,) = torch.autograd.grad(envelope.sum(), r)
    envelope = envelope.detach()
    assert float(envelope[0]) == 1.0 and float(envelope[500]) == pytest.approx(0.0, abs=1e-15)
    assert float(slope[495:].abs().max()) < 2e-2 and torch.all(envelope[501:] == 0)


@pytest.mark.parametrize("name", ["egnn", "megnet", "gala", "nequip", "mace"])
def test_models_run_under_bf16_autocast_and_return_float32_energies(name):
    from helpers.physics import slab, small_bulk

    from matsciml.data.structures import batch_from_atoms
    from matsciml.models import EGNN, MACE, Gala, MegNet, NequIP

    torch.manual_seed(0)  # the bound below is for an untrained model: fix which one
    models = {"egnn": EGNN, "megnet": MegNet, "gala": lambda: Gala(hidden=16, num_blocks=1), "nequip": NequIP}
    model = {**models, "mace": MACE}[name]().eval()
    batch = batch_from_atoms([slab(), small_bulk()], cutoff=6.0, representation=model.representation)
    with torch.no_grad():
        reference = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(batch)
    # sums in float32 whatever the layers ran in; bf16 keeps ~3 digits per layer, so a deep
    # untrained model lands within tens of percent, not to float32 precision
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert float((mixed - reference).abs().max()) < 0.5 * float(reference.abs().max())
