"""MACE passes the physics battery, is O(3)-equivariant, and keeps MACE's defaults."""

from pathlib import Path

import numpy as np
import pytest
import torch
from e3nn import o3
from helpers.physics import PhysicsBattery, energy_and_forces, slab, small_bulk
from scipy.spatial.transform import Rotation

from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.data.structures import batch_from_atoms
from matsciml.models import MACE, AbstractEnergyModel

# vector features between the layers (hidden_l_max 1): the battery sees every kind of path
SMALL = {
    "num_features": 4,
    "hidden_l_max": 1,
    "sh_l_max": 2,
    "radial_hidden": [8],
    "readout_hidden": 4,
    "avg_num_neighbors": 20.0,
}


class TestMACE(PhysicsBattery):
    def make_model(self):
        return MACE(cutoff=self.cutoff, **SMALL)


class TestMACESharedSpeciesWeights(PhysicsBattery):
    def make_model(self):
        return MACE(cutoff=self.cutoff, species_weights=False, **SMALL)


def small_mace(**overrides):
    torch.manual_seed(0)
    return MACE(cutoff=5.0, **{**SMALL, **overrides}).double().eval()


def graph(structures):
    return batch_from_atoms(structures, cutoff=5.0, dtype=torch.float64)


def transformed(atoms, matrix):
    out = atoms.copy()
    out.positions = atoms.positions @ matrix.T
    out.cell = atoms.cell.array @ matrix.T
    return out


@pytest.mark.parametrize("hidden_l_max", [0, 1])
@pytest.mark.parametrize("improper", [False, True])
def test_forces_equivariant_under_rotations_and_reflections(improper, hidden_l_max):
    # a proper rotation, or one times the inversion (a rotoreflection): with parity the energy is
    # O(3)-invariant and the forces turn with the structure
    model = small_mace(sh_l_max=3, correlation=3, hidden_l_max=hidden_l_max)
    atoms = slab()
    energy, forces = energy_and_forces(model, graph([atoms]))
    for seed in range(3):
        matrix = Rotation.random(random_state=seed).as_matrix() * (-1 if improper else 1)
        energy_t, forces_t = energy_and_forces(model, graph([transformed(atoms, matrix)]))
        assert torch.allclose(energy_t, energy, atol=1e-10, rtol=1e-12)
        assert torch.allclose(forces_t, forces @ torch.as_tensor(matrix.T), atol=1e-10)
    assert float(forces.abs().max()) > 1e-6, "no forces: the check is vacuous"


def test_without_parity_a_mirror_image_can_differ_but_rotations_cannot():
    model = small_mace(parity=False)
    atoms = small_bulk()
    energy, forces = energy_and_forces(model, graph([atoms]))
    matrix = Rotation.random(random_state=7).as_matrix()
    energy_t, forces_t = energy_and_forces(model, graph([transformed(atoms, matrix)]))
    assert torch.allclose(energy_t, energy, atol=1e-10, rtol=1e-12)
    assert torch.allclose(forces_t, forces @ torch.as_tensor(matrix.T), atol=1e-10)
    mirrored, _ = energy_and_forces(model, graph([transformed(atoms, -np.eye(3))]))
    assert not torch.allclose(mirrored, energy, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_each_correlation_order_builds_and_runs(correlation):
    model = small_mace(correlation=correlation)
    assert all(layer.contraction.correlation == correlation for layer in model.layers)
    energy, forces = energy_and_forces(model, graph([slab(), small_bulk()]))
    assert energy.shape == (2,) and torch.isfinite(energy).all() and torch.isfinite(forces).all()


def test_mace_defaults():
    model = MACE()
    assert len(model.layers) == 2 and model.cutoff == 5.0
    assert [layer.contraction.correlation for layer in model.layers] == [3, 3]
    assert model.edge_attributes.irreps_out == o3.Irreps("0e+1o+2e+3o")
    assert model.layers[0].contraction.irreps_in == o3.Irreps("32x0e+32x1o+32x2e+32x3o")
    assert model.layers[0].irreps_out == o3.Irreps("32x0e"), "hidden_l_max 0: 3x cheaper than 1 (docs/models.md)"
    assert model.layers[1].irreps_out == o3.Irreps("32x0e")
    vector_hidden = MACE(hidden_l_max=1)
    assert vector_hidden.layers[0].irreps_out == o3.Irreps("32x0e+32x1o")
    assert vector_hidden.layers[1].irreps_out == o3.Irreps("32x0e"), "the last layer keeps only scalars"
    assert vector_hidden.layers[1].contraction.irreps_in == o3.Irreps("32x0e+32x1o+32x2e+32x3o")
    assert model.radial_basis.frequencies.numel() == 8 and model.envelope.p == 5


def test_shared_species_weights_are_one_row_read_by_every_atom():
    from matsciml.models.species_axes import species_axes

    shared, per_species = small_mace(species_weights=False), small_mace()
    for layer in shared.layers:
        assert {w.shape[0] for w in layer.contraction.weights} == {1}
        assert {w.shape[0] for w in layer.self_connection.weights} == {1}
    # only the embedding and the scale and shift still grow with the elements of a fine-tune
    assert sorted(species_axes(shared)) == ["embedding.embedding.weight", "scale_shift.scale", "scale_shift.shift"]
    assert len(species_axes(per_species)) > 3
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in per_species.parameters())
    # the species still matter: through the embedding and the neighbours' features
    atoms = slab()
    swapped = atoms.copy()
    swapped.numbers[0] = 29 if atoms.numbers[0] != 29 else 46
    energies, _ = energy_and_forces(shared, graph([atoms, swapped]))
    assert not torch.isclose(energies[0], energies[1])


def test_an_untrained_model_starts_near_zero():
    model = MACE(cutoff=5.0, avg_num_neighbors=20.0).double()
    batch = graph([slab(), small_bulk()])
    with torch.no_grad():
        per_atom = model(batch) / torch.bincount(batch.structure_index)
    assert float(per_atom.abs().max()) < 0.05


def test_spec_round_trip_rebuilds_the_same_model():
    model = small_mace(correlation=2, parity=False)
    rebuilt = AbstractEnergyModel.from_spec(model.spec()).double().eval()
    rebuilt.load_state_dict(model.state_dict())
    batch = graph([slab()])
    assert model.spec()["class_path"] == "matsciml.models.mace.MACE"
    assert torch.equal(rebuilt(batch), model(batch))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="correlation must be 1, 2 or 3"):
        MACE(correlation=0)
    with pytest.raises(ValueError, match="correlation must be 1, 2 or 3"):
        MACE(correlation=4)
    with pytest.raises(ValueError, match="hidden_l_max must be"):
        MACE(hidden_l_max=3, sh_l_max=2)
    with pytest.raises(ValueError, match="avg_num_neighbors must be positive"):
        MACE(avg_num_neighbors=0.0)
    with pytest.raises(ValueError, match="cutoff must be positive"):
        MACE(cutoff=0)


def test_matsciml_fit_links_the_datas_average_neighbour_count(tmp_path, monkeypatch):
    # a real (2-batch) Lightning run on the S2EF devset: the statistic reaches MACE's spec in the
    # checkpoint and the buffers its neighbour sums are divided by
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    command = [
        "fit",
        "--config=configs/devset/s2ef-egnn.yaml",
        "--model.init_args.model=matsciml.models.MACE",
        "--model.init_args.model.init_args.num_features=4",
        "--model.init_args.model.init_args.sh_l_max=2",
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
    (checkpoint,) = tmp_path.glob("**/checkpoints/last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["hyper_parameters"]["model"]["init_args"]["avg_num_neighbors"] == expected
    assert saved["hyper_parameters"]["model"]["class_path"] == "matsciml.models.mace.MACE"
    for layer in (0, 1):
        norm = saved["state_dict"][f"model.layers.{layer}.interaction.neighbor_norm"]
        assert float(norm) == pytest.approx(expected**-0.5, rel=1e-6)
