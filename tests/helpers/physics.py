"""The physics battery every energy model passes (mix into a ``Test...`` class).

A model test class inherits :class:`PhysicsBattery` and implements ``make_model()``
(returning a float64-ready model). Structures are small EMT-free ASE systems built here;
forces are ``-dE/dpositions`` by autograd, as the tasks compute them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from scipy.spatial.transform import Rotation

from matsciml.data.structures import batch_from_atoms


def slab() -> Atoms:
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(atoms, "O", height=1.6, position="fcc")
    atoms.pbc = True
    atoms.rattle(stdev=0.1, seed=1)
    return atoms


def small_bulk() -> Atoms:
    atoms = bulk("Pt", "fcc", a=3.9, cubic=True)  # 4 atoms, cutoff larger than the cell
    atoms.rattle(stdev=0.08, seed=2)
    return atoms


def molecule_like() -> Atoms:
    atoms = Atoms("CO2H", positions=[[0, 0, 0], [1.2, 0.1, 0], [-1.1, 0.3, 0.2], [0.3, 1.0, -0.4]])
    atoms.pbc = False
    return atoms


def energy_and_forces(model, batch):
    positions = batch.positions.detach().clone().requires_grad_(True)
    energy = model(batch.replace(positions=positions))
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    return energy.detach(), -gradient


class PhysicsBattery:
    """Shared tests; subclasses define ``make_model``. Cutoff of the test graphs: ``cutoff``."""

    cutoff = 5.0
    #: finite-range models repeat exactly under a supercell; set False for models without a cutoff
    finite_cutoff = True
    #: the batch the model reads; set it from the model (``representation = Model.representation``)
    representation = "graph"

    def make_model(self) -> torch.nn.Module:
        raise NotImplementedError

    @pytest.fixture
    def model(self):
        torch.manual_seed(0)
        return self.make_model().double().eval()

    def batch(self, structures):
        return batch_from_atoms(structures, cutoff=self.cutoff, max_neighbors=None, dtype=torch.float64,
                                representation=self.representation)

    def test_output_shape_is_one_energy_per_structure(self, model):
        batch = self.batch([slab(), small_bulk(), molecule_like()])
        energy = model(batch)
        assert energy.shape == (3,) and energy.dtype == torch.float64
        assert torch.isfinite(energy).all()

    def test_a_structure_alone_equals_it_inside_a_batch(self, model):
        structures = [slab(), small_bulk(), molecule_like()]
        together, forces_together = energy_and_forces(model, self.batch(structures))
        start = 0
        for index, atoms in enumerate(structures):
            alone, forces_alone = energy_and_forces(model, self.batch([atoms]))
            assert torch.allclose(alone[0], together[index], atol=1e-10, rtol=1e-10)
            assert torch.allclose(forces_alone, forces_together[start : start + len(atoms)], atol=1e-10)
            start += len(atoms)

    def test_energy_invariant_and_forces_equivariant_under_rotation(self, model):
        atoms = slab()
        energy, forces = energy_and_forces(model, self.batch([atoms]))
        rotation = Rotation.random(random_state=3).as_matrix()
        turned = atoms.copy()
        turned.positions = atoms.positions @ rotation.T
        turned.cell = atoms.cell.array @ rotation.T
        energy_turned, forces_turned = energy_and_forces(model, self.batch([turned]))
        assert torch.allclose(energy_turned, energy, atol=1e-9)
        assert torch.allclose(forces_turned, forces @ torch.as_tensor(rotation.T), atol=1e-9)

    def test_energy_invariant_under_translation_and_permutation(self, model):
        atoms = slab()
        energy, forces = energy_and_forces(model, self.batch([atoms]))
        moved = atoms.copy()
        moved.positions += np.array([0.7, -1.3, 0.4])
        assert torch.allclose(energy_and_forces(model, self.batch([moved]))[0], energy, atol=1e-9)
        order = np.random.default_rng(4).permutation(len(atoms))
        shuffled = atoms[order]
        energy_shuffled, forces_shuffled = energy_and_forces(model, self.batch([shuffled]))
        assert torch.allclose(energy_shuffled, energy, atol=1e-9)
        assert torch.allclose(forces_shuffled, forces[torch.as_tensor(order)], atol=1e-9)

    def test_forces_are_minus_the_energy_gradient_by_finite_differences(self, model):
        batch = self.batch([small_bulk()])
        _, forces = energy_and_forces(model, batch)
        step = 1e-5
        numeric = torch.zeros_like(forces)
        with torch.no_grad():
            for atom in range(batch.num_atoms):
                for axis in range(3):
                    plus, minus = batch.positions.clone(), batch.positions.clone()
                    plus[atom, axis] += step
                    minus[atom, axis] -= step
                    e_plus = model(batch.replace(positions=plus)).sum()
                    e_minus = model(batch.replace(positions=minus)).sum()
                    numeric[atom, axis] = -(e_plus - e_minus) / (2 * step)
        assert float((numeric - forces).abs().max()) < 1e-6

    def test_periodic_images_supercell_gives_n_times_the_energy(self, model):
        if not self.finite_cutoff:
            pytest.skip("no finite cutoff: the 2x2x1 supercell check applies to finite-range models only")
        atoms = small_bulk()
        energy, forces = energy_and_forces(model, self.batch([atoms]))
        supercell = atoms.repeat((2, 2, 1))
        energy_super, forces_super = energy_and_forces(model, self.batch([supercell]))
        assert torch.allclose(energy_super, 4 * energy, atol=1e-8, rtol=1e-10)
        assert torch.allclose(forces_super, forces.repeat(4, 1), atol=1e-9)

    def test_force_path_passes_gradcheck(self, model):
        batch = self.batch([small_bulk()])

        def forces_of(positions):
            energy = model(batch.replace(positions=positions))
            return -torch.autograd.grad(energy.sum(), positions, create_graph=True)[0]

        positions = batch.positions.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(forces_of, (positions,), eps=1e-6, atol=1e-5)

    def test_overfits_four_structures(self):
        torch.manual_seed(0)
        model = self.make_model().double()
        structures = [slab(), small_bulk(), molecule_like(), bulk("Cu", "fcc", a=3.6)]
        batch = self.batch(structures)
        targets = torch.tensor([-3.0, 1.5, 0.5, -0.7], dtype=torch.float64)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(300):
            optimizer.zero_grad()
            loss = (model(batch) - targets).abs().mean()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        # the first loss is that of a near-zero output (the models start their last layer small)
        assert min(losses[-10:]) < losses[0] / 5
