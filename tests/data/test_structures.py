"""batch_from_atoms: exact float64 geometry, fixed atoms and the same graph as the datasets."""

import numpy as np
import torch
from ase.constraints import FixAtoms
from helpers.structures import slab_atoms

from matsciml.data.neighbors import radius_graph
from matsciml.data.structures import batch_from_atoms


def test_batch_from_atoms_keeps_float64_geometry_and_fixed_atoms():
    atoms = slab_atoms(0)
    atoms.set_constraint(FixAtoms(indices=[0, 2]))
    batch = batch_from_atoms([atoms, atoms], cutoff=4.0, dtype=torch.float64)
    assert batch.positions.dtype == torch.float64
    assert np.array_equal(batch.positions[: len(atoms)].numpy(), atoms.positions)
    assert batch.fixed[: len(atoms)].nonzero().flatten().tolist() == [0, 2]
    edge_index, shifts = radius_graph(atoms.positions, atoms.cell.array, atoms.pbc, 4.0, 50)
    assert np.array_equal(batch.edge_index[:, : edge_index.shape[1]].numpy(), edge_index)
    assert batch.num_edges == 2 * edge_index.shape[1] and batch.sid.tolist() == [0, 1]
