"""E(n)-equivariant graph neural network (Satorras, Hoogeboom and Welling, 2021).

Each layer passes messages ``m_ij = phi_e(h_i, h_j, |r_ij|^2 / cutoff^2, rbf(|r_ij|))`` along the
periodic radius graph, weights them by a smooth cutoff envelope, sums them per centre and
updates ``h_i <- h_i + phi_h(h_i, sum_j m_ij)``. The energy is a sum of per-atom outputs
of the final invariant features.

Three deliberate departures from the paper, all for forces:

* no coordinate updates: only invariant features drive the energy, which keeps it exactly
  invariant under rotations, translations and periodic images (the paper's position MLP is
  therefore absent);
* SiLU instead of ReLU by default, and a cosine envelope on messages, so that energies are
  smooth and forces ``-dE/dx`` continuous (ReLU networks have discontinuous forces);
* the edge input adds ``num_radial`` Gaussians of the distance to the paper's single squared
  distance: with one scalar, the initial forces are ~1e-5 of the targets and an L1 force loss
  barely moves them on the S2EF devset; with 16 Gaussians force errors fall 3x in 200 steps.

Defaults follow the Open MatSci ML Toolkit paper's Table 3: hidden 32, 3 layers, node MLP
[48, 48], edge MLP [16, 16], node projection depth 2 / hidden 128, output block depth 3 /
hidden 64, sum readout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from matsciml.data.batch import Batch
from matsciml.models.base import AbstractEnergyModel
from matsciml.models.layers import init_output_layer, mlp
from matsciml.models.species_axes import SpeciesAxis


class EGNNLayer(nn.Module):
    """One message-passing layer on invariant features."""

    def __init__(
        self,
        hidden: int,
        edge_sizes: Sequence[int],
        node_sizes: Sequence[int],
        activation: str,
        num_edge_features: int = 1,
    ):
        super().__init__()
        self.edge_mlp = mlp([2 * hidden + num_edge_features, *edge_sizes], activation, last_activation=True)
        self.node_mlp = mlp([hidden + edge_sizes[-1], *node_sizes, hidden], activation)

    def forward(
        self, h: torch.Tensor, edge_index: torch.Tensor, radial: torch.Tensor, envelope: torch.Tensor
    ) -> torch.Tensor:
        """``radial``: edge features ``(E, num_edge_features)``; ``envelope``: ``(E,)``."""
        j, i = edge_index
        messages = self.edge_mlp(torch.cat([h[i], h[j], radial], dim=-1)) * envelope.unsqueeze(-1)
        aggregated = messages.new_zeros((h.shape[0], messages.shape[-1])).index_add(0, i, messages)
        return h + self.node_mlp(torch.cat([h, aggregated], dim=-1))


class EGNN(AbstractEnergyModel):
    """EGNN energy model on periodic radius graphs.

    Args:
        hidden: width of the atom features.
        num_layers: message-passing layers.
        edge_sizes: hidden sizes of the edge MLP (its last size is the message width).
        node_sizes: hidden sizes of the node-update MLP.
        projection_depth, projection_hidden: MLP from the species embedding to ``hidden``.
        output_depth, output_hidden: per-atom output MLP before the sum readout.
        activation: ``"silu"`` (default, smooth forces), ``"relu"`` (the paper) or ``"tanh"``.
        cutoff: interaction radius in Å (messages fade to zero there).
        num_radial: Gaussians of the distance in the edge input (0: the paper's squared distance only).
        num_species: size of the atomic-number embedding (Z from 1 to num_species).
    """

    per_atom = True

    def __init__(
        self,
        hidden: int = 32,
        num_layers: int = 3,
        edge_sizes: Sequence[int] = (16, 16),
        node_sizes: Sequence[int] = (48, 48),
        projection_depth: int = 2,
        projection_hidden: int = 128,
        output_depth: int = 3,
        output_hidden: int = 64,
        activation: str = "silu",
        cutoff: float = 6.0,
        num_radial: int = 16,
        num_species: int = 100,
    ):
        super().__init__(cutoff=cutoff)
        if num_layers < 1 or projection_depth < 1 or output_depth < 1:
            raise ValueError("num_layers, projection_depth and output_depth must be at least 1")
        if num_radial < 0:
            raise ValueError(f"num_radial must be >= 0, got {num_radial}")
        if len(edge_sizes) < 1:  # its last size is the message width
            raise ValueError("edge_sizes must hold at least one size, got none")
        self.register_buffer("radial_centres", torch.linspace(0.0, cutoff, num_radial))
        # width: neighbouring Gaussians cross at about half height
        self.radial_width = cutoff / max(num_radial - 1, 1)
        self.num_species = num_species
        self.embedding = nn.Embedding(num_species + 1, projection_hidden)
        self.projection = mlp([projection_hidden] * projection_depth + [hidden], activation)
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, list(edge_sizes), list(node_sizes), activation, 1 + num_radial) for _ in range(num_layers)
        )
        self.output = mlp([hidden] + [output_hidden] * (output_depth - 1) + [1], activation)
        init_output_layer(self.output[-1])

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        """The embedding's rows are atomic numbers (:mod:`matsciml.models.species_axes`)."""
        return {"embedding.weight": SpeciesAxis(dim=0)}

    def energy(self, batch: Batch) -> torch.Tensor:
        numbers = batch.atomic_numbers
        self.check_species(numbers)
        vectors = self.edge_vectors(batch)
        distances = vectors.norm(dim=-1)
        gaussians = torch.exp(-0.5 * ((distances.unsqueeze(-1) - self.radial_centres) / self.radial_width) ** 2)
        radial = torch.cat([(distances.unsqueeze(-1) / self.cutoff) ** 2, gaussians], dim=-1)
        envelope = self.cosine_cutoff(distances, self.cutoff)
        h = self.projection(self.embedding(numbers).to(vectors.dtype))
        for layer in self.layers:
            h = layer(h, batch.edge_index, radial, envelope)
        return self.output(h).squeeze(-1)
