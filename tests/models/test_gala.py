"""Gala passes the shared physics battery on point clouds, keeps the paper's sizes, ignores padding
and sees periodic cells through the nearest image."""

import copy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from helpers.physics import PhysicsBattery, cutoff_path, energy_and_forces, molecule_like, slab, small_bulk

from matsciml.data import S2EFDataModule
from matsciml.data.structures import batch_from_atoms
from matsciml.models.gala import Gala
from matsciml.models.gala_layers import MaskedMomentumLayerNormalization, MaskedMomentumNormalization
from matsciml.tasks import S2EFTask


def clouds(structures, dtype=torch.float64):
    return batch_from_atoms(structures, dtype=dtype, representation="point_cloud")


def assert_no_finite_range(model):
    """Gala has no cutoff (its inherited ``cutoff`` is unused): an atom 40 Å away still changes the energy."""
    assert model.representation == "point_cloud"  # every atom in the cloud, no radius graph
    near = molecule_like() + Atoms("H", positions=[[40.0, 0.0, 0.0]])
    far = molecule_like() + Atoms("H", positions=[[41.0, 0.0, 0.0]])
    near.pbc = far.pbc = False
    with torch.no_grad():
        change = float(model(clouds([near]))[0] - model(clouds([far]))[0])
    assert abs(change) > 1e-8


class TestGala(PhysicsBattery):
    representation = Gala.representation

    def make_model(self):
        return Gala(hidden=16, num_blocks=2)

    def test_a_perfect_crystal_feels_no_force(self, model):
        # Gala has no cutoff: each pair is seen once, at its nearest image. In fcc supercells many
        # pairs have two or more equally near images (216 of 702 pairs in a 3x3x3 primitive supercell,
        # pairs half a cell apart in cubic ones); minimum image must pick one, which breaks the
        # crystal's symmetry for any model without a cutoff. An odd simple-cubic supercell has a
        # unique nearest image for every pair (separations of 0 or +-1/3 of each orthogonal cell
        # vector), so there the forces must cancel.
        crystal = bulk("Cu", "sc", a=2.5).repeat((3, 3, 3))
        _, forces = energy_and_forces(model, self.batch([crystal]))
        rattled = crystal.copy()
        rattled.rattle(stdev=0.05, seed=5)
        _, forces_rattled = energy_and_forces(model, self.batch([rattled]))
        assert float(forces_rattled.abs().max()) > 1e-6, "the model gives no forces at all: the check is vacuous"
        assert float(forces.abs().max()) < 1e-10

    def test_energy_along_a_pair_crossing_the_cutoff_is_minus_the_work(self, model):
        # not applicable: no cutoff for a pair to cross. The energy along the same path must
        # still be minus the work of the force (no jumps), with every atom in the cloud throughout
        assert_no_finite_range(model)
        path = cutoff_path(6.0, steps=100)
        assert clouds([path[0]]).point_mask.sum() == clouds([path[-1]]).point_mask.sum() == 3
        self.check_energy_is_the_work_along(model, path, moving=2)

    def test_periodic_images_supercell_gives_n_times_the_energy(self, model):
        # not applicable: attention spans the whole cloud, so a supercell's atoms see every copy
        # and the energy is not extensive; what holds is that the model has no finite range
        assert_no_finite_range(model)

    def test_atoms_farther_apart_than_the_cutoff_add_their_energies(self, model):
        # not applicable: no cutoff, so no atom is out of another's reach (attention spans the cloud)
        assert_no_finite_range(model)


class TestGalaEquivariant(TestGala):
    """The other paths: equivariant blocks, normalised products, mean merge and join, no value LayerNorm."""

    def make_model(self):
        return Gala(
            hidden=16,
            num_blocks=1,
            equivariant_attention=True,
            include_normalized_products=True,
            merge_fun="mean",
            join_fun="mean",
            value_normalization="none",
        )


@pytest.mark.parametrize("equivariant", [False, True])
@pytest.mark.parametrize("structure", [slab, small_bulk])
def test_energy_and_forces_are_those_of_the_wrapped_structure(structure, equivariant):
    torch.manual_seed(0)
    model = Gala(hidden=16, num_blocks=2, equivariant_attention=equivariant).double().eval()
    atoms = structure()
    energy, forces = energy_and_forces(model, clouds(atoms))
    # one atom moved by a lattice vector
    moved = atoms.copy()
    moved.positions[1] += np.array([1, -2, 1]) @ atoms.cell.array
    energy_moved, forces_moved = energy_and_forces(model, clouds(moved))
    assert torch.allclose(energy_moved, energy, atol=1e-10, rtol=0)
    assert torch.allclose(forces_moved, forces, atol=1e-10, rtol=0)
    # every atom wrapped into the cell, after a translation that takes some of them out of it
    wrapped = atoms.copy()
    wrapped.positions += 0.5 * atoms.cell.array.sum(axis=0)
    translated = wrapped.positions.copy()
    wrapped.wrap()
    assert not np.allclose(wrapped.positions, translated), "the check needs atoms that wrap"
    energy_wrapped, forces_wrapped = energy_and_forces(model, clouds(wrapped))
    assert torch.allclose(energy_wrapped, energy, atol=1e-10, rtol=0)
    assert torch.allclose(forces_wrapped, forces, atol=1e-10, rtol=0)


def test_non_periodic_directions_are_not_wrapped():
    torch.manual_seed(0)
    model = Gala(hidden=16, num_blocks=1).double().eval()
    atoms = slab()
    atoms.pbc = [True, True, False]
    energy = model(clouds(atoms))
    along_a, along_c = atoms.copy(), atoms.copy()
    along_a.positions[1] += atoms.cell.array[0]
    along_c.positions[1] += atoms.cell.array[2]
    assert torch.allclose(model(clouds(along_a)), energy, atol=1e-10, rtol=0)
    assert not torch.allclose(model(clouds(along_c)), energy, atol=1e-6, rtol=0)


def test_s2ef_devset_clouds_give_a_force_for_every_target_atom():
    torch.manual_seed(0)
    batch = next(
        iter(S2EFDataModule.from_devset(batch_size=2, representation="point_cloud", shuffle=False).train_dataloader())
    )
    task = S2EFTask(Gala(hidden=16, num_blocks=1)).eval()
    forces = task(batch)["forces"]
    assert forces.shape == batch.forces.shape
    assert (forces.abs().sum(dim=-1) > 0).all(), "every atom of the slab is in its cloud and has a force"


def test_paper_sized_defaults():
    model = Gala()
    assert model.input_dim == 200 and model.embedding.in_features == 200 and model.embedding.out_features == 100
    attention = model.blocks[0].attention
    assert (attention.merge_fun, attention.join_fun, attention.rank) == ("concat", "concat", 2)
    assert attention.invariant_mode == "full" and attention.covariant_mode == "full"
    assert attention.value_net[1].in_features == 4  # |r_ij|, |r_ik|, r_ij . r_ik, |r_ij ^ r_ik|
    assert isinstance(attention.value_net[0], MaskedMomentumNormalization)
    assert isinstance(attention.value_net[2], torch.nn.LayerNorm) and isinstance(
        attention.score_net[1], torch.nn.LayerNorm
    )
    assert isinstance(model.blocks[0].norm, torch.nn.LayerNorm) and model.blocks[0].vector_attention is None
    assert len(model.blocks) == 3 and model.num_parameters() == 346_305
    equivariant = Gala(equivariant_attention=True)
    assert isinstance(equivariant.blocks[0].vector_norm, MaskedMomentumLayerNormalization)
    assert equivariant.blocks[0].vector_attention.covariant_mode == "full"


def test_bad_settings_are_refused():
    for kwargs, message in [
        ({"merge_fun": "sum"}, "merge_fun must be one of"),
        ({"join_fun": "max"}, "join_fun must be one of"),
        ({"invariant_mode": "all"}, "invariant_mode must be one of"),
        ({"covariant_mode": "none"}, "covariant_mode must be one of"),
        ({"invariant_value_normalization": "batch"}, "invariant_value_normalization must be one of"),
        ({"equivariant_value_normalization": "momentum"}, "equivariant_value_normalization must be one of"),
        ({"score_normalization": "batch"}, "score_normalization must be one of"),
        ({"block_normalization": "momentum"}, "block_normalization must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"rank": 1}, "rank must be 2"),
        ({"num_blocks": -1}, "num_blocks must be >= 0"),
        ({"hidden": 0}, "must be positive"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            Gala(**kwargs)


def test_a_graph_batch_is_refused():
    graph = batch_from_atoms(slab(), cutoff=5.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="Gala needs point clouds"):
        Gala(hidden=8, num_blocks=1).double()(graph)


def test_the_one_hot_width_must_match_num_species():
    with pytest.raises(ValueError, match="num_species=50"):
        Gala(num_species=50, hidden=8, num_blocks=1).double()(clouds(slab()))


@pytest.mark.parametrize("equivariant", [False, True])
def test_padding_slots_have_no_influence(equivariant):
    torch.manual_seed(0)
    model = Gala(hidden=16, num_blocks=2, equivariant_attention=equivariant).double().eval()
    batch = clouds([small_bulk(), slab(), molecule_like()])  # 4, 9 and 4 points: padded to 9
    padding = ~batch.point_mask
    assert padding.sum() == 10
    energy, forces = energy_and_forces(model, batch)
    # padding slots pointing at other atoms, with junk species features
    junk = batch.replace(
        point_index=torch.where(padding, batch.num_atoms - 1, batch.point_index),
        point_features=torch.where(padding.unsqueeze(-1), torch.rand_like(batch.point_features), batch.point_features),
    )
    energy_junk, forces_junk = energy_and_forces(model, junk)
    assert torch.allclose(energy_junk, energy, atol=1e-12, rtol=0)
    assert torch.allclose(forces_junk, forces, atol=1e-12, rtol=0)
    # padding with a bigger structure changes nothing either
    alone, forces_alone = energy_and_forces(model, clouds([small_bulk()]))
    assert torch.allclose(alone[0], energy[0], atol=1e-12, rtol=0)
    assert torch.allclose(forces_alone, forces[:4], atol=1e-12, rtol=0)


def test_training_statistics_ignore_padding_and_the_rest_of_the_batch():
    torch.manual_seed(0)
    model = Gala(hidden=16, num_blocks=1, equivariant_attention=True).double().train()
    batch = clouds([small_bulk(), slab()])
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    energy = first(batch)
    junk = batch.replace(
        point_features=torch.where(
            ~batch.point_mask.unsqueeze(-1), torch.rand_like(batch.point_features), batch.point_features
        ),
        point_index=torch.where(batch.point_mask, batch.point_index, batch.num_atoms - 1),
    )
    assert torch.allclose(second(junk), energy, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(first.buffers(), second.buffers(), strict=True))
    norm = first.blocks[0].attention.value_net[0]
    assert not torch.equal(norm.mu, torch.zeros_like(norm.mu)), "statistics must move in training"
    # in training, a batch is normalised with the statistics from before it
    alone = copy.deepcopy(model)(clouds([small_bulk()]))
    assert torch.allclose(alone[0], energy[0], atol=1e-10, rtol=0)


def test_an_isolated_atom_has_an_energy_and_no_force():
    torch.manual_seed(0)
    model = Gala(hidden=16, num_blocks=1).double().eval()
    energy, forces = energy_and_forces(model, clouds([bulk("Cu", "fcc", a=3.6)]))
    assert torch.isfinite(energy).all() and torch.equal(forces, torch.zeros_like(forces))


def test_forces_stay_smooth_through_collinear_atoms():
    # |r_ij ^ r_ik| has a cusp where bonds are parallel; the package's exact norm gives a
    # force that jumps there (gradcheck of the force path fails), the smooth norm does not
    torch.manual_seed(0)
    model = Gala(hidden=8, num_blocks=1).double().eval()
    batch = clouds(Atoms("COO", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]]))

    def forces_of(positions):
        energy = model(batch.replace(positions=positions))
        return -torch.autograd.grad(energy.sum(), positions, create_graph=True)[0]

    positions = batch.positions.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(forces_of, (positions,), eps=1e-6, atol=1e-5)
