"""The radius graph must give exactly the pairs and shifts ASE's neighbour list gives."""

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

from matsciml.data.neighbors import RadiusGraph, neighbor_calculator, radius_graph


def _pair_set(j, i, shifts):
    return {(int(a), int(b), *map(int, s)) for a, b, s in zip(i, j, shifts, strict=True)}


def _ase_pairs(atoms, cutoff):
    i, j, shifts = neighbor_list("ijS", atoms, cutoff)
    return _pair_set(j, i, shifts)


def _ours(atoms, cutoff, max_neighbors=None):
    edge_index, shifts = radius_graph(atoms.positions, atoms.cell.array, atoms.pbc, cutoff, max_neighbors)
    return edge_index, shifts


def _triclinic():
    rng = np.random.default_rng(0)
    cell = np.array([[5.1, 0.0, 0.0], [1.7, 4.6, 0.0], [-0.9, 1.2, 5.4]])
    return Atoms("Cu4Pt4", scaled_positions=rng.random((8, 3)), cell=cell, pbc=True)


CASES = {
    "triclinic": (_triclinic(), 4.0),
    "tiny_cell_cutoff_over_half_cell": (bulk("Cu", "fcc", a=3.6), 6.0),  # one atom, many self images
    "tiny_triclinic": (bulk("Al", "hcp", a=2.9, c=4.7), 5.0),
    "slab_periodic_in_two_directions": (fcc111("Pt", (2, 2, 3), vacuum=5.0, periodic=False), 6.0),
    "molecule_no_periodicity": (molecule("CH3CH2OH"), 3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_pairs_and_shifts_match_ase(name):
    atoms, cutoff = CASES[name]
    if name.startswith("slab"):
        atoms.pbc = (True, True, False)
    edge_index, shifts = _ours(atoms, cutoff)
    ours = _pair_set(edge_index[0], edge_index[1], shifts)
    assert len(ours) == edge_index.shape[1], "duplicate edges"
    assert ours == _ase_pairs(atoms, cutoff)


def test_edge_vectors_reproduce_ase_distance_vectors():
    atoms, cutoff = CASES["triclinic"]
    edge_index, shifts = _ours(atoms, cutoff)
    j, i = edge_index
    vectors = atoms.positions[j] - atoms.positions[i] + shifts @ atoms.cell.array
    i_ase, j_ase, d_ase = neighbor_list("ijD", atoms, cutoff)
    assert np.allclose(np.sort(np.linalg.norm(vectors, axis=1)), np.sort(np.linalg.norm(d_ase, axis=1)))
    assert np.all(np.linalg.norm(vectors, axis=1) <= cutoff)


def test_tiny_cell_has_self_image_edges_in_both_directions():
    atoms = bulk("Cu", "fcc", a=3.6)
    edge_index, shifts = _ours(atoms, 6.0)
    assert np.all(edge_index == 0)
    assert not np.any(np.all(shifts == 0, axis=1)), "an atom is not its own neighbour in the home cell"
    assert _pair_set(edge_index[0], edge_index[1], shifts) == _pair_set(edge_index[0], edge_index[1], -shifts)


def test_max_neighbors_keeps_the_nearest_deterministically():
    atoms = _triclinic()
    all_index, all_shifts = _ours(atoms, 6.0)
    capped_index, capped_shifts = _ours(atoms, 6.0, max_neighbors=10)
    for centre in range(len(atoms)):
        mask_all = all_index[1] == centre
        mask_cap = capped_index[1] == centre
        assert mask_cap.sum() == min(10, mask_all.sum())

        def dist(index, shifts, mask, centre=centre):
            j = index[0][mask]
            vectors = atoms.positions[j] - atoms.positions[centre] + shifts[mask] @ atoms.cell.array
            return np.linalg.norm(vectors, axis=1)

        kept = dist(capped_index, capped_shifts, mask_cap)
        everything = np.sort(dist(all_index, all_shifts, mask_all))
        assert np.allclose(np.sort(kept), everything[:10])


class _ShuffledPairs:
    """A vesin neighbour list that returns its pairs in a random order (as another version or thread count may)."""

    def __init__(self, cutoff, seed):
        self.inner, self.rng = neighbor_calculator(cutoff), np.random.default_rng(seed)

    def compute(self, *args, **kwargs):
        arrays = [np.array(a) for a in self.inner.compute(*args, **kwargs)]
        order = self.rng.permutation(len(arrays[0]))
        return [a[order] for a in arrays]


@pytest.mark.parametrize("atoms", [bulk("Cu", "fcc", a=3.6, cubic=True), _triclinic()], ids=["ties", "triclinic"])
def test_the_capped_graph_does_not_depend_on_vesins_pair_order(atoms):
    # the cap falls inside a shell of tied distances (12 nearest neighbours in fcc, 5 kept): which
    # tied neighbours are kept must come from the tie-break, not from the order vesin lists pairs in
    edge_index, shifts = radius_graph(atoms.positions, atoms.cell.array, atoms.pbc, 4.0, 5)
    for seed in range(3):
        calculator = _ShuffledPairs(4.0, seed)
        shuffled_index, shuffled_shifts = radius_graph(atoms.positions, atoms.cell.array, atoms.pbc, 4.0, 5, calculator)
        assert np.array_equal(shuffled_index, edge_index) and np.array_equal(shuffled_shifts, shifts)


def test_the_default_graph_keeps_every_pair_within_the_cutoff():
    # fcc Cu has 78 neighbours within 6 Å: a cap of 50 would fall inside the fifth shell
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    edge_index, _ = radius_graph(atoms.positions, atoms.cell.array, atoms.pbc)
    assert np.all(np.bincount(edge_index[1]) == 78)
    record = {"positions": atoms.positions, "cell": atoms.cell.array, "pbc": atoms.pbc}
    assert RadiusGraph()(record)["edge_index"].shape[1] == 78 * len(atoms)


def test_ties_are_broken_by_neighbour_index_in_a_symmetric_crystal():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)  # 12 nearest neighbours at exactly the same distance
    edge_index, shifts = _ours(atoms, 3.0, max_neighbors=5)
    for centre in range(len(atoms)):
        mask = edge_index[1] == centre
        neighbours = edge_index[0][mask]
        assert np.all(np.diff(neighbours) >= 0), "ties must be ordered by neighbour index"


def test_a_structure_without_neighbours_gets_an_empty_graph():
    # isolated atoms are valid data (they carry per-element reference energies), not an error
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 9.0]], pbc=False)
    record = {"positions": atoms.positions, "cell": np.zeros((3, 3)), "pbc": np.zeros(3, bool)}
    graph = RadiusGraph(cutoff=6.0)(record)
    assert graph["edge_index"].shape == (2, 0) and graph["cell_shifts"].shape == (0, 3)


@pytest.mark.parametrize("bad", [{"cutoff": 0.0}, {"cutoff": -1.0}])
def test_bad_cutoff_is_rejected(bad):
    with pytest.raises(ValueError, match="cutoff must be positive"):
        RadiusGraph(**bad)
