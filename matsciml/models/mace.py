"""MACE: higher-order equivariant message passing (Batatia et al., NeurIPS 2022).

Each of the ``num_interactions`` layers

1. builds the atomic basis ``A_i = sum_j R(|r_ij|) Y(r_ij) (x) W h_j / sqrt(avg_num_neighbors)``
   (:class:`~matsciml.models.equivariant_layers.Interaction`: spherical harmonics up to
   ``sh_l_max``, radial MLP of Bessel functions times a polynomial envelope), one channel per
   feature and one block per harmonic;
2. raises the body order with the symmetric contraction
   (:class:`~matsciml.models.symmetric_contraction.SymmetricContraction`): products of up to
   ``correlation`` copies of ``A_i``, channel by channel, mixed by species-dependent weights, so a
   single layer already sees ``correlation + 1``-body terms;
3. updates ``h_i <- Linear(m_i) + SpeciesLinear(h_i, Z_i)`` (the residual self-connection).

Every layer reads out a per-atom energy from its scalars (a linear for the inner layers, a small
MLP for the last); their sum, refined by a per-species scale and shift, is the atom's energy.
Unlike NequIP there is no gate: the only nonlinearity in the features is the polynomial of the
contraction, which is why two layers are enough (the receptive field is ``2 * cutoff``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from e3nn import o3
from torch import nn

from matsciml.data.batch import Batch
from matsciml.models.base import AbstractEnergyModel
from matsciml.models.equivariant_layers import (
    BesselBasis,
    EdgeAttributes,
    Interaction,
    PerSpeciesScaleShift,
    PolynomialEnvelope,
    ScalarReadout,
    SpeciesEmbedding,
    SpeciesLinear,
    reachable,
    sh_irreps,
)
from matsciml.models.nequip import FALLBACK_AVG_NUM_NEIGHBORS
from matsciml.models.symmetric_contraction import SymmetricContraction


class MACELayer(nn.Module):
    """Interaction -> symmetric contraction -> linear, plus a species-dependent residual.

    Args:
        irreps_in: node features entering the layer.
        irreps_sh: edge spherical harmonics; the A-features have ``num_features`` channels of each.
        irreps_out: node features leaving the layer.
        num_features: channels of the A-features.
        correlation: most copies of A multiplied in the contraction.
        num_basis, radial_hidden, avg_num_neighbors: of the interaction's radial MLP and sum.
        num_species: atomic numbers 1 .. num_species.
        species_weights: the contraction's and the self-connection's weights depend on the centre's
            species (MACE's); ``False``: one set shared by all species.

    Shapes:
        ``h (num_atoms, irreps_in.dim)``, ``numbers (num_atoms,)``, ``edge_sh (num_edges, irreps_sh.dim)``,
        ``edge_radial (num_edges, num_basis)``, ``edge_index (2, num_edges)`` -> ``(num_atoms, irreps_out.dim)``.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_out: o3.Irreps,
        num_features: int,
        correlation: int,
        num_basis: int,
        radial_hidden: Sequence[int],
        avg_num_neighbors: float,
        num_species: int,
        species_weights: bool = True,
    ):
        super().__init__()
        irreps_a = reachable(irreps_in, irreps_sh, o3.Irreps([(num_features, ir) for _, ir in irreps_sh]))
        self.interaction = Interaction(irreps_in, irreps_sh, irreps_a, num_basis, radial_hidden, avg_num_neighbors)
        # shared: tables of one row, which every atom reads (row 0)
        self.species_weights = species_weights
        rows = num_species if species_weights else 0
        self.contraction = SymmetricContraction(irreps_a, irreps_out, correlation, rows + 1)
        self.linear = o3.Linear(irreps_out, irreps_out)
        self.self_connection = SpeciesLinear(irreps_in, irreps_out, rows)
        self.irreps_out = o3.Irreps(irreps_out)

    def forward(
        self,
        h: torch.Tensor,
        numbers: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_radial: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        a = self.interaction(h, edge_sh, edge_radial, edge_index)
        rows = numbers if self.species_weights else numbers.new_zeros(numbers.shape)
        return self.linear(self.contraction(a, rows)) + self.self_connection(h, rows)


class MACE(AbstractEnergyModel):
    """MACE-class equivariant potential (see the module docstring for the architecture).

    Args:
        cutoff: radius in Å (linked from the data by the CLI).
        num_features: channels of every irrep of the hidden and A-features (MACE's 32 or 128).
        hidden_l_max: highest ``l`` of the hidden features between layers: ``0`` (default,
            MACE's "L=0": ``num_features x 0e``, as in the MACE-MP small models) or ``1``
            (``num_features x (0e + 1o)``, about 2.5x the cost of a force-training step: the
            second interaction's paths grow from 4 to 10 at ``sh_l_max=3``).
            The last layer keeps only scalars either way.
        sh_l_max: highest ``l`` of the edge spherical harmonics (and of the A-features).
        correlation: copies of A multiplied in the symmetric contraction, 1 to 3 (MACE's default 3).
        num_interactions: message-passing layers.
        num_basis: Bessel functions of the radial basis.
        envelope_p: exponent of the polynomial envelope (C2 at the cutoff).
        radial_hidden: hidden widths of the radial MLP.
        readout_hidden: hidden width of the last layer's readout MLP.
        avg_num_neighbors: neighbour sums are divided by its square root; a statistic of the
            training data that ``matsciml fit`` links in. ``None``: NequIP's fallback,
            :data:`~matsciml.models.nequip.FALLBACK_AVG_NUM_NEIGHBORS`.
        parity: O(3) (``True``) or only SO(3) equivariance (see ``equivariant_layers``).
        num_species: atomic numbers 1 .. num_species.
        species_weights: ``True`` (MACE's): the symmetric contraction's weights and the
            self-connection depend on the centre's species. ``False``: one set for all species,
            which then differ through their embedding, the neighbours' features and the per-species
            scale and shift only; fewer parameters, and on the 200-structure S2EF devset a lower
            validation force error (docs/benchmarks.md).
    """

    per_atom = True
    autocast = False  # e3nn's tensor products mix dtypes under autocast: run in float32

    def __init__(
        self,
        cutoff: float = 5.0,
        num_features: int = 32,
        hidden_l_max: int = 0,
        sh_l_max: int = 3,
        correlation: int = 3,
        num_interactions: int = 2,
        num_basis: int = 8,
        envelope_p: int = 5,
        radial_hidden: Sequence[int] = (64, 64, 64),
        readout_hidden: int = 16,
        avg_num_neighbors: float | None = None,
        parity: bool = True,
        num_species: int = 100,
        species_weights: bool = True,
    ):
        super().__init__(cutoff)
        if num_interactions < 1 or num_features < 1 or readout_hidden < 1:
            raise ValueError("num_interactions, num_features and readout_hidden must be at least 1")
        if not 1 <= correlation <= 3:
            # 4 copies of 16 components: coefficient tensors of 16^4 x paths, slow to build
            raise ValueError(f"correlation must be 1, 2 or 3 (MACE's body orders up to 4), got {correlation}")
        if hidden_l_max < 0 or hidden_l_max > sh_l_max:
            raise ValueError(f"hidden_l_max must be 0 .. sh_l_max={sh_l_max}, got {hidden_l_max}")
        if avg_num_neighbors is not None and not avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be positive (a mean neighbour count), got {avg_num_neighbors}")
        avg_num_neighbors = float(avg_num_neighbors or FALLBACK_AVG_NUM_NEIGHBORS)
        self.num_species = num_species
        self.embedding = SpeciesEmbedding(num_species, num_features)
        self.edge_attributes = EdgeAttributes(sh_l_max, parity)
        self.radial_basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        irreps_sh = self.edge_attributes.irreps_out
        hidden = o3.Irreps([(num_features, ir) for _, ir in sh_irreps(hidden_l_max, parity)])
        scalars = o3.Irreps(f"{num_features}x0e")
        self.layers = nn.ModuleList()
        self.readouts = nn.ModuleList()
        irreps = self.embedding.irreps_out
        for index in range(num_interactions):
            last = index == num_interactions - 1
            layer = MACELayer(
                irreps,
                irreps_sh,
                scalars if last else hidden,
                num_features,
                correlation,
                num_basis,
                list(radial_hidden),
                avg_num_neighbors,
                num_species,
                species_weights,
            )
            self.layers.append(layer)
            self.readouts.append(ScalarReadout(layer.irreps_out, readout_hidden if last else None))
            irreps = layer.irreps_out
        self.scale_shift = PerSpeciesScaleShift(num_species)

    def energy(self, batch: Batch) -> torch.Tensor:
        numbers = batch.atomic_numbers
        self.check_species(numbers)
        vectors = self.edge_vectors(batch)
        distances = vectors.norm(dim=-1)
        edge_sh = self.edge_attributes(vectors)
        edge_radial = self.radial_basis(distances) * self.envelope(distances).unsqueeze(-1)
        h = self.embedding(numbers).to(vectors.dtype)
        energy = h.new_zeros(h.shape[0])
        for layer, readout in zip(self.layers, self.readouts, strict=True):
            h = layer(h, numbers, edge_sh, edge_radial, batch.edge_index)
            energy = energy + readout(h)
        return self.scale_shift(energy, numbers)
