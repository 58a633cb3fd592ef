"""NequIP passes the physics battery (parity on and off), is O(3)-equivariant, and keeps nequip's sizes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant
from helpers.physics import PhysicsBattery, energy_and_forces, molecule_like, slab
from scipy.spatial.transform import Rotation

from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.models import AbstractEnergyModel, NequIP

SMALL = dict(num_layers=2, num_features=4, radial_hidden=(8,), avg_num_neighbors=30.0)


class TestNequIP(PhysicsBattery):
    def make_model(self):
        return NequIP(cutoff=self.cutoff, **SMALL)


class TestNequIPWithoutParity(PhysicsBattery):
    def make_model(self):
        return NequIP(cutoff=self.cutoff, parity=False, l_max=2, **SMALL)


def _transformed(atoms, matrix):
    moved = atoms.copy()
    moved.positions = atoms.positions @ matrix.T
    moved.cell = atoms.cell.array @ matrix.T
    return moved


def _model(**kwargs):
    torch.manual_seed(0)
    return NequIP(**{**SMALL, **kwargs}).double().eval()


def _battery_batch(structures):
    return TestNequIP().batch(structures)


@pytest.mark.parametrize("seed", [3, 7])
def test_forces_are_equivariant_under_rotations_and_reflections(seed):
    model, atoms = _model(), slab()
    energy, forces = energy_and_forces(model, _battery_batch([atoms]))
    rotation = Rotation.random(random_state=seed).as_matrix()
    for matrix in (rotation, -rotation, rotation @ np.diag([1.0, 1.0, -1.0])):  # rotation, with inversion, mirror
        energy_moved, forces_moved = energy_and_forces(model, _battery_batch([_transformed(atoms, matrix)]))
        assert torch.allclose(energy_moved, energy, atol=1e-10)
        assert torch.allclose(forces_moved, forces @ torch.as_tensor(matrix.T), atol=1e-10)


def test_forces_pass_e3nns_assert_equivariant_with_parity():
    # a cluster without a cell: positions in, forces out, both vectors, under rotations and the inversion
    model, batch = _model(), _battery_batch([molecule_like()])

    def forces_of(positions):
        return energy_and_forces(model, batch.replace(positions=positions))[1]

    vectors = o3.Irreps("1x1o")  # e3nn's basis is (y, z, x): a cyclic relabelling, still a rotation
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn draws its rotations in the default dtype
    try:
        errors = assert_equivariant(
            forces_of, args_in=[batch.positions], irreps_in=[vectors], irreps_out=[vectors], do_parity=True
        )
    finally:
        torch.set_default_dtype(default)
    scale = float(forces_of(batch.positions).abs().max())
    assert scale > 1e-5, "no forces: the check would be vacuous"
    assert len(errors) >= 2 and max(errors.values()) < 1e-9 * scale  # with and without the inversion


def test_without_parity_the_model_is_chiral():
    # even-only irreps read the edge vector as a pseudovector: a cross product (layer 2) dotted with an
    # edge (layer 3) is a triple product, so mirrored structures get other forces (SO(3) only); small at
    # initialisation, but far above float64 rounding, which is all that the parity-on model shows
    mirror = np.diag([1.0, 1.0, -1.0])
    atoms, flip = slab(), torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    for parity, low, high in ((False, 1e-9, 1.0), (True, 0.0, 1e-13)):
        model = _model(parity=parity, num_layers=3, num_features=16)
        _, forces = energy_and_forces(model, _battery_batch([atoms]))
        _, forces_mirrored = energy_and_forces(model, _battery_batch([_transformed(atoms, mirror)]))
        assert low <= float((forces_mirrored - forces * flip).abs().max()) < high


def test_defaults_are_nequips_small_model():
    model = NequIP(num_species=3)
    assert len(model.layers) == 3 and model.edge_attributes.irreps_out == o3.Irreps("0e+1o")
    assert model.basis.frequencies.numel() == 8 and model.envelope.p == 6
    assert model.layers[0].conv.radial.hs == [8, 64, 64, 64]
    assert model.layers[1].irreps_out == o3.Irreps("32x0e+32x1e+32x1o")
    assert model.layers[-1].irreps_out == o3.Irreps("32x0e")
    # nequip 0.19.1 at this size, 3 species: 216,704 parameters, of which 163,840 in self-connections (a tensor
    # product with a 32-wide species embedding) and 96 in that embedding; the rest is the same network
    others = ("self_connection", "embedding", "scale_shift")
    shared = sum(p.numel() for name, p in model.named_parameters() if not any(o in name for o in others))
    assert shared == 216_704 - 163_840 - 96


def test_a_reloaded_model_from_its_spec_is_identical():
    model = _model(avg_num_neighbors=17.5)
    spec = model.spec()
    assert spec["init_args"]["avg_num_neighbors"] == 17.5
    clone = AbstractEnergyModel.from_spec(spec).double().eval()
    clone.load_state_dict(model.state_dict())
    batch = _battery_batch([slab()])
    assert torch.equal(model(batch), clone(batch))
    # a model built with another statistic takes the trained one from the state dict (a buffer)
    other = NequIP(**{**SMALL, "avg_num_neighbors": 50.0}).double().eval()
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(batch), model(batch))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="avg_num_neighbors must be positive"):
        NequIP(avg_num_neighbors=0.0)
    with pytest.raises(ValueError, match="num_layers and num_features"):
        NequIP(num_layers=0)


def test_matsciml_fit_links_the_datas_average_neighbour_count(tmp_path, monkeypatch):
    # a real (2-batch) Lightning run on the S2EF devset: the statistic reaches the model, its spec in the
    # checkpoint (so a reloaded model is the trained one) and the buffer the sums are divided by
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    command = [
        "fit",
        "--config=configs/devset/s2ef-egnn.yaml",
        "--model.init_args.model=matsciml.models.NequIP",
        "--model.init_args.model.init_args.num_layers=2",
        "--model.init_args.model.init_args.num_features=4",
        "--data.init_args.cutoff=5.0",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert main(command) == 0
    expected = S2EFDataModule.from_devset(cutoff=5.0).avg_num_neighbors
    assert 10 < expected < 60
    (checkpoint,) = tmp_path.glob("**/checkpoints/last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["model"]["init_args"]["avg_num_neighbors"] == expected
    norm = saved["state_dict"]["model.layers.0.conv.neighbor_norm"]
    assert float(norm) == pytest.approx(expected**-0.5, rel=1e-6)
