"""The per-atom matrix-product convolution against e3nn's edge-by-edge tensor product (the reference)."""

import pytest
import torch
from e3nn import o3

from matsciml.models import base as model_base
from matsciml.models.equivariant_layers import EdgeAttributes, Interaction, gate_for, hidden_irreps
from matsciml.models.neighbour_products import NeighbourTensorProduct, padded_slots

# scalar inputs (MACE's L=0 and every model's first layer) and mixed ones (NequIP's hidden layers)
CASES = {
    "scalars": ("6x0e", 3, "6x0e+6x1o+6x2e+6x3o"),
    "mixed": (str(hidden_irreps(3, l_max=1)), 2, str(gate_for(hidden_irreps(4, l_max=2)).irreps_in)),
}


def _graph(num_atoms: int, num_edges: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(num_atoms - 1, (2, num_edges), generator=generator)  # the last atom: no edges
    return edge_index


def _interaction(case: str) -> Interaction:
    irreps_in, sh_l_max, irreps_out = CASES[case]
    edges = EdgeAttributes(sh_l_max)
    return Interaction(irreps_in, edges.irreps_out, irreps_out, num_basis=4, radial_hidden=(8,), avg_num_neighbors=5.0)


def test_slots_give_each_edge_its_own_row_within_its_centres_block():
    centres = torch.tensor([2, 0, 2, 2, 1, 0])
    slots, width = padded_slots(centres, num_atoms=4)
    assert width == 3
    assert sorted(slots.tolist()) == sorted(set(slots.tolist()))  # no two edges share a row
    assert torch.equal(slots // width, centres)
    assert slots.tolist() == [6, 0, 7, 8, 3, 1]  # ranks follow the edge order within a centre


@pytest.mark.parametrize("case", sorted(CASES))
def test_forces_and_weight_gradients_equal_e3nns(case):
    # a force-training step's quantities: the aggregate, its gradient in the edge vectors with
    # create_graph, and the gradient of a loss on those forces in every parameter
    torch.set_default_dtype(torch.float64)  # e3nn's buffers exact too: the two must agree to ~1e-12
    try:
        torch.manual_seed(0)
        interaction = _interaction(case)
        edges = EdgeAttributes(len(interaction.irreps_sh) - 1)
        edge_index = _graph(12, 90, seed=3)
        x = interaction.irreps_in.randn(12, -1)
        vectors = torch.randn(edge_index.shape[1], 3)
        radial = torch.rand(edge_index.shape[1], 4)

        def step(compiled_path: bool):
            positions = vectors.clone().requires_grad_()
            if compiled_path:
                with model_base.tracing():  # what a traced model takes: e3nn's tensor product
                    out = interaction(x, edges(positions), radial, edge_index)
            else:
                out = interaction(x, edges(positions), radial, edge_index)
            energy = out.sin().sum()
            (forces,) = torch.autograd.grad(energy, positions, create_graph=True)
            gradients = torch.autograd.grad(forces.pow(2).sum() + energy, list(interaction.parameters()))
            return out, forces, gradients

        ours, reference = step(False), step(True)
        assert torch.allclose(ours[0], reference[0], atol=1e-12)
        assert ours[0][-1].abs().max() < 1e-8  # an atom without neighbours receives nothing
        assert torch.allclose(ours[1], reference[1], atol=1e-11)
        for mine, theirs in zip(ours[2], reference[2], strict=True):
            assert torch.allclose(mine, theirs, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_no_edges_gives_zeros():
    interaction = _interaction("mixed")
    x = interaction.irreps_in.randn(3, -1)
    sh = torch.zeros(0, interaction.irreps_sh.dim)
    weights = torch.zeros(0, interaction.tp.weight_numel)
    out = interaction.neighbour_tp(x, sh, weights, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (3, interaction.irreps_mid.dim) and not out.any()


def test_refuses_products_it_does_not_compute():
    shared = o3.FullyConnectedTensorProduct("2x0e", "0e+1o", "2x0e+2x1o")
    with pytest.raises(ValueError, match="per-edge weights"):
        NeighbourTensorProduct(shared)
