"""NequIP: E(3)-equivariant message passing with tensor-product convolutions (Batzner et al., 2022).

Atoms carry irreps features (scalars, vectors, ... up to ``l_max``). Each layer

1. convolves neighbour features with the spherical harmonics of the edge directions, weighted
   per edge by an MLP of a Bessel radial basis times a C2 polynomial envelope, and sums them
   onto the centre divided by ``sqrt(avg_num_neighbors)`` (:class:`~.equivariant_layers.Interaction`);
2. adds a self-connection, a linear map of the atom's own features whose weights depend on its
   species (:class:`~.equivariant_layers.SpeciesLinear`, as nequip's tensor product with the
   one-hot species, gathered instead of contracted);
3. applies a gated nonlinearity (:func:`~.equivariant_layers.gate_for`).

The last layer outputs scalars only; a linear (or small MLP) reads a per-atom energy, which a
learnable per-species scale and shift refine (the task normalises energies already).

Defaults are nequip 0.19.1's small model (3 layers, ``l_max`` 1, parity, 32 features, 8 Bessel
functions, ``p = 6``, radial MLP 2 x 64); the cutoff is linked from the data, and so is
``avg_num_neighbors`` (the training split's mean neighbour count on the data's radius graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from e3nn import o3
from torch import nn

from matsciml.data.batch import Batch
from matsciml.models.base import AbstractEnergyModel
from matsciml.models.edge_pairs import undirected_pairs
from matsciml.models.equivariant_layers import (
    BesselBasis,
    EdgeAttributes,
    Interaction,
    PerSpeciesScaleShift,
    PolynomialEnvelope,
    ScalarReadout,
    SpeciesEmbedding,
    SpeciesLinear,
    gate_for,
    hidden_irreps,
    reachable,
)

#: used when no data statistic is given (a model built outside the CLI); ~fcc within 5 Å
FALLBACK_AVG_NUM_NEIGHBORS = 20.0


class NequIPLayer(nn.Module):
    """Convolution + species self-connection + gate; residual when input and output irreps agree."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_hidden: o3.Irreps,
        num_basis: int,
        radial_hidden: Sequence[int],
        avg_num_neighbors: float,
        num_species: int,
        self_connection: bool,
    ):
        super().__init__()
        self.gate = gate_for(reachable(irreps_in, irreps_sh, irreps_hidden))
        self.irreps_out = self.gate.irreps_out
        self.conv = Interaction(irreps_in, irreps_sh, self.gate.irreps_in, num_basis, radial_hidden, avg_num_neighbors)
        self.self_connection = SpeciesLinear(irreps_in, self.gate.irreps_in, num_species) if self_connection else None

    def forward(
        self,
        x: torch.Tensor,
        numbers: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_radial: torch.Tensor,
        edge_index: torch.Tensor,
        pair: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.conv(x, edge_sh, edge_radial, edge_index, pair)
        if self.self_connection is not None:
            out = out + self.self_connection(x, numbers)
        return self.gate(out)


class NequIP(AbstractEnergyModel):
    """NequIP energy model on periodic radius graphs.

    Args:
        num_layers: interaction layers (the last one outputs scalars only).
        l_max: highest degree of the spherical harmonics and features.
        parity: O(3) features (both parities of every ``l``); ``False``: even irreps only, SO(3)
            (see :mod:`~matsciml.models.equivariant_layers`), faster.
        num_features: multiplicity of every irrep of the hidden features.
        num_basis: Bessel functions of the distance.
        trainable_bessel: learn the Bessel frequencies.
        envelope_p: exponent ``p`` of the polynomial envelope.
        radial_hidden: hidden widths of the radial MLP giving the tensor-product weights.
        readout_hidden: hidden width of an MLP readout; ``None``: a linear readout (nequip's).
        avg_num_neighbors: the neighbour sums are divided by its square root; a statistic of the
            training data, set by ``matsciml fit`` (data module's ``avg_num_neighbors``). ``None``:
            :data:`FALLBACK_AVG_NUM_NEIGHBORS`.
        self_connection: add the species-dependent self-connection in layers after the first
            (nequip's; the first layer's input is the species embedding itself).
        cutoff: interaction radius in Å (linked from the data).
        num_species: atomic numbers 1..num_species are accepted.
    """

    per_atom = True
    autocast = False  # e3nn's tensor products mix dtypes under autocast: run in float32

    def __init__(
        self,
        num_layers: int = 3,
        l_max: int = 1,
        parity: bool = True,
        num_features: int = 32,
        num_basis: int = 8,
        trainable_bessel: bool = False,
        envelope_p: int = 6,
        radial_hidden: Sequence[int] = (64, 64),
        readout_hidden: int | None = None,
        avg_num_neighbors: float | None = None,
        self_connection: bool = True,
        cutoff: float = 6.0,
        num_species: int = 100,
    ):
        super().__init__(cutoff=cutoff)
        if num_layers < 1 or num_features < 1:
            raise ValueError(f"num_layers and num_features must be >= 1, got {num_layers}, {num_features}")
        if avg_num_neighbors is not None and not avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be positive (a mean neighbour count), got {avg_num_neighbors}")
        self.num_species = num_species
        self.avg_num_neighbors = float(avg_num_neighbors or FALLBACK_AVG_NUM_NEIGHBORS)
        self.embedding = SpeciesEmbedding(num_species, num_features)
        self.edge_attributes = EdgeAttributes(l_max, parity)
        self.basis = BesselBasis(cutoff, num_basis, trainable_bessel)
        self.envelope = PolynomialEnvelope(cutoff, envelope_p)
        hidden = hidden_irreps(num_features, l_max, parity)
        irreps = self.embedding.irreps_out
        self.layers = nn.ModuleList()
        for index in range(num_layers):
            target = hidden if index < num_layers - 1 else o3.Irreps(f"{num_features}x0e")
            layer = NequIPLayer(
                irreps,
                self.edge_attributes.irreps_out,
                target,
                num_basis,
                list(radial_hidden),
                self.avg_num_neighbors,
                num_species,
                self_connection and index > 0,
            )
            self.layers.append(layer)
            irreps = layer.irreps_out
        self.readout = ScalarReadout(irreps, readout_hidden)
        self.scale_shift = PerSpeciesScaleShift(num_species)

    def energy(self, batch: Batch) -> torch.Tensor:
        numbers = batch.atomic_numbers
        self.check_species(numbers)
        vectors = self.edge_vectors(batch)
        edge_sh = self.edge_attributes(vectors)
        # the radial part once per atom pair (both directions share it): half the radial-MLP work
        representatives, pair = undirected_pairs(batch.edge_index, batch.cell_shifts)
        distances = vectors.index_select(0, representatives).norm(dim=-1)
        edge_radial = self.basis(distances) * self.envelope(distances).unsqueeze(-1)
        x = self.embedding(numbers).to(vectors.dtype)
        for layer in self.layers:
            x = layer(x, numbers, edge_sh, edge_radial, batch.edge_index, pair)
        return self.scale_shift(self.readout(x), numbers)
