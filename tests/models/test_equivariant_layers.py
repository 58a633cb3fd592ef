"""The equivariant building blocks: smooth radial parts, equivariant convolution and self-connection."""

import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from matsciml.models.edge_pairs import undirected_pairs
from matsciml.models.equivariant_layers import (
    BesselBasis,
    EdgeAttributes,
    Interaction,
    PerSpeciesScaleShift,
    PolynomialEnvelope,
    ScalarReadout,
    SpeciesLinear,
    gate_for,
    hidden_irreps,
    reachable,
)


def test_envelope_is_one_at_zero_and_c2_smooth_to_zero_at_the_cutoff():
    envelope = PolynomialEnvelope(cutoff=5.0, p=6)
    # just inside rc (at rc itself the step alone would give zeros): a C2 zero leaves value ~ d^3,
    # slope ~ d^2 and curvature ~ d at a distance d from it (prefactors ~ p^3 / rc^3 ~ 3)
    d = 1e-4
    r = torch.tensor([0.0, 5.0 - d], dtype=torch.float64, requires_grad=True)
    value = envelope(r)
    (slope,) = torch.autograd.grad(value.sum(), r, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), r)
    value, slope = value.detach(), slope.detach()
    assert value[0] == 1.0 and slope[0] == 0.0
    assert abs(float(value[1])) < 10 * d**3 and abs(float(slope[1])) < 30 * d**2 and abs(float(curvature[1])) < 30 * d
    # the polynomial itself does not vanish beyond rc: the step makes it exactly 0 there
    assert torch.equal(envelope(torch.tensor([5.0001, 7.0, 11.0], dtype=torch.float64)), torch.zeros(3).double())
    inside = envelope(torch.linspace(0.0, 4.999, 500, dtype=torch.float64))
    assert (inside > 0).all() and (inside.diff() <= 0).all()


def test_bessel_basis_is_finite_at_zero_and_matches_its_formula():
    basis = BesselBasis(cutoff=5.0, num_basis=8)
    r = torch.tensor([0.0, 1e-9, 1.3, 4.9], dtype=torch.float64)
    values = basis(r)
    assert values.shape == (4, 8) and torch.isfinite(values).all()
    n = torch.arange(1, 9, dtype=torch.float64)
    limit = (2 / 5.0) ** 0.5 * n * torch.pi / 5.0
    assert torch.allclose(values[0], limit) and torch.allclose(values[1], limit)
    assert torch.allclose(values[2], (2 / 5.0) ** 0.5 * torch.sin(n * torch.pi * 1.3 / 5.0) / 1.3)
    assert sum(p.numel() for p in BesselBasis(5.0, 8, trainable=True).parameters()) == 8


def _random_graph(num_atoms=6, num_edges=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(num_atoms, (2, num_edges), generator=generator)
    return edge_index


@pytest.mark.parametrize("parity", [True, False])
def test_an_interaction_is_equivariant(parity):
    # features and edge vectors rotate (and, with parity, reflect) together; the radial input is invariant
    torch.manual_seed(0)
    edges = EdgeAttributes(l_max=2, parity=parity)
    irreps_in = hidden_irreps(4, l_max=1, parity=parity)
    gate = gate_for(hidden_irreps(5, l_max=2, parity=parity))
    interaction = Interaction(irreps_in, edges.irreps_out, gate.irreps_in, num_basis=3, radial_hidden=(8,))
    edge_index = _random_graph()
    radial = torch.rand(edge_index.shape[1], 3)

    def convolve(x, vectors):
        return gate(interaction(x, edges(vectors), radial, edge_index))

    vector_irreps = "1x1o" if parity else "1x1e"  # parity off: e3nn reads the edge vector as a pseudovector
    errors = assert_equivariant(
        convolve,
        args_in=[irreps_in.randn(6, -1), torch.randn(edge_index.shape[1], 3)],
        irreps_in=[irreps_in, vector_irreps],
        irreps_out=[gate.irreps_out],
        do_parity=True,
    )
    assert len(errors) >= 2  # rotations with and without the inversion were checked


def test_aggregate_is_forward_before_the_last_linear():
    torch.manual_seed(1)
    edges = EdgeAttributes(l_max=1)
    interaction = Interaction("4x0e+2x1o", edges.irreps_out, "3x0e+3x1o", num_basis=4, avg_num_neighbors=9.0)
    edge_index = _random_graph()
    args = (interaction.irreps_in.randn(6, -1), edges(torch.randn(20, 3)), torch.rand(20, 4), edge_index)
    aggregated = interaction.aggregate(*args)
    assert aggregated.shape == (6, interaction.irreps_mid.dim)
    assert torch.allclose(interaction.linear_2(aggregated), interaction(*args))


def test_species_linear_is_equivariant_and_depends_on_the_species():
    torch.manual_seed(2)
    layer = SpeciesLinear("3x0e+2x1o+2x1e", "4x0e+3x1o+1x2e", num_species=10)
    numbers = torch.tensor([1, 8, 8, 3])

    errors = assert_equivariant(
        lambda x: layer(x, numbers),
        args_in=[layer.irreps_in.randn(4, -1)],
        irreps_in=[layer.irreps_in],
        irreps_out=[layer.irreps_out],
        do_parity=True,
    )
    assert len(errors) >= 2
    x = layer.irreps_in.randn(1, -1).repeat(4, 1)
    out = layer(x, numbers)
    assert torch.allclose(out[1], out[2]) and not torch.allclose(out[0], out[1])
    assert torch.equal(out[:, -5:], torch.zeros(4, 5))  # 2e has no input: zero


def test_reachable_irreps_follow_the_selection_rules():
    sh = o3.Irreps("0e+1o")
    assert reachable(o3.Irreps("8x0e"), sh, hidden_irreps(8, 1)) == o3.Irreps("8x0e+8x1o")
    # 1o x 1o gives 1e; 0o needs a 1e input
    assert reachable(o3.Irreps("8x0e+8x1o"), sh, hidden_irreps(8, 1)) == o3.Irreps("8x0e+8x1e+8x1o")


def test_readout_and_scale_shift_start_near_identity():
    torch.manual_seed(3)
    readout = ScalarReadout("8x0e+4x1o", hidden=16)
    x = o3.Irreps("8x0e+4x1o").randn(5, -1)
    assert readout(x).shape == (5,) and readout(x).abs().max() < 0.1  # small last layer
    scale_shift = PerSpeciesScaleShift(num_species=10)
    energies = torch.randn(5)
    assert torch.equal(scale_shift(energies, torch.tensor([1, 2, 3, 4, 5])), energies)


def test_undirected_pairs_join_each_edge_with_its_reverse():
    from helpers.physics import slab, small_bulk

    from matsciml.data.structures import batch_from_atoms
    from matsciml.models.base import AbstractEnergyModel

    # small_bulk: a 4-atom cell inside a 6 Å cutoff, so atoms see periodic images of themselves (i == j)
    for atoms, cap in ((small_bulk(), None), (slab(), None), (slab(), 7)):
        batch = batch_from_atoms([atoms], cutoff=6.0, max_neighbors=cap, dtype=torch.float64)
        representatives, pair = undirected_pairs(batch.edge_index, batch.cell_shifts)
        distances = AbstractEnergyModel.edge_vectors(batch).norm(dim=-1)
        assert torch.equal(distances[representatives][pair], distances)  # bitwise: reverse vectors are negatives
        assert torch.equal(pair[representatives], torch.arange(len(representatives)))
        sizes = torch.bincount(pair)
        if cap is None:
            assert len(representatives) * 2 == batch.num_edges and (sizes == 2).all()
        else:  # a neighbour cap keeps some edges without their reverse: pairs of one
            assert (sizes == 1).any() and sizes.max() == 2
