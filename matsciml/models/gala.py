"""Geometric algebra attention network, Gala (Spellings, 2021), on padded point clouds.

Every atom ``i`` sees its structure as a point cloud of bond vectors ``r_ij = r_j - r_i`` to
all the other atoms of the cloud (no cutoff). In a periodic cell ``r_ij`` goes to the nearest
image of ``j`` (minimum image, :func:`~matsciml.data.pointcloud.minimum_image_vectors`), so
the energy is a function of the wrapped structure: moving an atom by a lattice vector changes
nothing. Each pair is seen once, through its nearest image only, so in a small cell an atom
does not see the farther images of its neighbours, nor its own (a 2x2x1 supercell does not
give 4x the energy); and ``r_ij`` jumps to another image where the pair is as far from two
images (half a cell apart along an orthogonal lattice vector), where energy and forces are
discontinuous (there is no cutoff to hide the switch).
Each bond carries the paper's symmetric one-hot input, the species of ``i`` and of ``j``
(``2 * num_species`` = 200 numbers, embedded linearly into ``hidden``). Blocks of
geometric-algebra attention (``geometric_algebra_attention.pytorch.VectorAttention``,
rotation-invariant mode) then update every bond's value from the geometric products
``r_ij r_ik`` of bond pairs of the same atom: the invariants of those products (lengths,
dot and wedge norms) feed a value network, the score network turns the joined values into
attention weights over ``k``, and a residual MLP follows. A final permutation-invariant
attention (``reduce=True``) pools each atom's bonds into one vector, an MLP maps it to a
per-atom energy, and energies are summed per structure over real atoms only.

Padding never reaches a real output: tuples with a padding or self bond are masked out
of every softmax (their weights are exactly zero), bond values and vectors of masked
bonds are reset to zero after each block (so no gradient flows through the padded gather
of atom 0), and the final sum uses ``point_mask``. A structure therefore gives the same
energy alone or in any padded batch, up to rounding.

Departures from the paper and from the package's defaults, each for forces or batching:

* smooth norms: the invariant ``|r_ij ^ r_ik|`` has a cusp where two bonds are parallel,
  so with the package's exact norm forces jump at collinear atoms, and the double backward
  of a force loss divides by 1e-19 on every ``k = j`` tuple. Here every norm is
  ``sqrt(|x|^2 + eps^2)`` with ``eps`` = 1e-2 (Å or Å^2), far below a typical invariant;
* masked momentum normalisation: the package's ``MomentumNormalization`` (invariant
  values) and ``MomentumLayerNormalization`` (equivariant values) average over the whole
  array, padding included. Here their running statistics come from real tuples only, and
  in training a batch is normalised with the statistics gathered *before* it, which are
  then updated: a structure's energy never depends on the rest of its batch, in training
  or in ``eval()``. Batch normalisation is not offered for the same reason;
* a species term: an atom's pooled vector is added to an embedding of its own species, so
  an atom without neighbours (a one-atom cloud) still has an energy;
* SiLU activations (smooth forces), and a residual MLP after each attention (the attention
  itself combines bond values only linearly, with softmax weights).

Optional rotation-*equivariant* blocks (``equivariant_attention=True``) first update the
bond vectors with ``Vector2VectorAttention`` (using ``covariant_mode``) and the
``momentum_layer`` normalisation; energies stay invariant and translation-free.

Defaults follow the Open MatSci ML Toolkit paper's Table 5: input 200 (100 species), hidden
100, merge and join ``"concat"``, invariant and covariant modes ``"full"``, rank 2,
invariant-value normalisation ``"momentum"``, equivariant ``"momentum_layer"``, value,
score and block normalisation ``"layer"``. Three blocks (346k parameters, against the
paper's ~1.5M) are our choice: the cost is linear in blocks and grows as
``B * M**(rank + 1) * hidden`` for ``B`` clouds of ``M`` points, which suits the few dozen
atoms of an OC20 slab (every atom for S2EF, a sampled cloud for IS2RE).
"""

from __future__ import annotations

import torch
from geometric_algebra_attention.pytorch import VectorAttention
from torch import nn

from matsciml.data.batch import Batch
from matsciml.data.pointcloud import minimum_image_vectors
from matsciml.models.base import AbstractEnergyModel
from matsciml.models.gala_layers import (
    EquivariantAttention,
    InvariantAttention,
    MaskedMomentumLayerNormalization,
    MaskedMomentumNormalization,
)
from matsciml.models.layers import ACTIVATIONS, init_output_layer
from matsciml.models.species_axes import SpeciesAxis

#: smooth activations only: forces are derivatives of the energy
SMOOTH_ACTIVATIONS = ("silu", "tanh")
MODES = ("single", "partial", "full")
COMBINE = ("mean", "concat")


# -- building blocks ------------------------------------------------------------------------
def _layer_norm(kind: str, width: int) -> nn.Module:
    return nn.LayerNorm(width) if kind == "layer" else nn.Identity()


class _Settings:
    """The attention settings every layer of one model shares."""

    def __init__(
        self,
        hidden: int,
        rank: int,
        merge_fun: str,
        join_fun: str,
        invariant_mode: str,
        covariant_mode: str,
        include_normalized_products: bool,
        invariant_value_normalization: str,
        value_normalization: str,
        score_normalization: str,
        activation: str,
        momentum: float,
    ):
        self.hidden = hidden
        self.activation = activation
        self.invariant_value_normalization = invariant_value_normalization
        self.value_normalization = value_normalization
        self.score_normalization = score_normalization
        self.momentum = momentum
        self.attention_kwargs = dict(
            merge_fun=merge_fun,
            join_fun=join_fun,
            rank=rank,
            invariant_mode=invariant_mode,
            covariant_mode=covariant_mode,
            include_normalized_products=include_normalized_products,
        )
        self.num_invariants = VectorAttention.get_invariant_dims(rank, invariant_mode, include_normalized_products)

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def value_net(self) -> nn.Sequential:
        """Invariants of the geometric products -> ``hidden`` values; entry 0 normalises them."""
        width = self.hidden
        norm = (
            MaskedMomentumNormalization(self.num_invariants, self.momentum)
            if self.invariant_value_normalization == "momentum"
            else nn.Identity()
        )
        return nn.Sequential(
            norm,
            nn.Linear(self.num_invariants, width),
            _layer_norm(self.value_normalization, width),
            self.act(),
            nn.Linear(width, width),
        )

    def score_net(self) -> nn.Sequential:
        """Joined values -> one logit (or, for ``scale_net``, one vector scale)."""
        width = self.hidden
        return nn.Sequential(
            nn.Linear(width, width), _layer_norm(self.score_normalization, width), self.act(), nn.Linear(width, 1)
        )

    def invariant(self, reduce: bool) -> InvariantAttention:
        return InvariantAttention(
            self.hidden, self.score_net(), self.value_net(), reduce=reduce, **self.attention_kwargs
        )

    def equivariant(self) -> EquivariantAttention:
        return EquivariantAttention(
            self.hidden, self.score_net(), self.value_net(), self.score_net(), reduce=False, **self.attention_kwargs
        )


def attend(layer: VectorAttention, vectors: torch.Tensor, values: torch.Tensor, bonds: torch.Tensor) -> torch.Tensor:
    """Run a package attention layer over each atom's bonds, masking tuples with unreal bonds.

    Shapes:
        vectors ``(B, M, M, 3)``, values ``(B, M, M, H)``, bonds ``(B, M, M)`` True for real
        bonds ``i -> j``; returns ``(B, M, M, ...)`` (``reduce=False``) or ``(B, M, ...)``.
    """
    norm = layer.value_net[0]
    if isinstance(norm, MaskedMomentumNormalization):
        tuples = bonds[..., :, None] & bonds[..., None, :]  # rank 2; broadcast below for others
        for _ in range(layer.rank - 2):
            tuples = tuples[..., None] & bonds[..., None, None, :]
        with norm.masked(tuples):
            return layer((vectors, values), mask=bonds)
    return layer((vectors, values), mask=bonds)


class GalaBlock(nn.Module):
    """One block: optional equivariant update of the bond vectors, then of the bond values."""

    def __init__(
        self, settings: _Settings, equivariant: bool, equivariant_value_normalization: str, block_normalization: str
    ):
        super().__init__()
        self.vector_attention = settings.equivariant() if equivariant else None
        self.vector_norm = (
            MaskedMomentumLayerNormalization(settings.momentum)
            if equivariant and equivariant_value_normalization == "momentum_layer"
            else None
        )
        self.attention = settings.invariant(reduce=False)
        self.norm = _layer_norm(block_normalization, settings.hidden)
        self.mlp = nn.Sequential(
            nn.Linear(settings.hidden, settings.hidden), settings.act(), nn.Linear(settings.hidden, settings.hidden)
        )

    def forward(
        self, vectors: torch.Tensor, values: torch.Tensor, bonds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        real = bonds.unsqueeze(-1)
        if self.vector_attention is not None:
            update = attend(self.vector_attention, vectors, values, bonds)
            if self.vector_norm is not None:
                update = self.vector_norm(update, bonds)
            vectors = torch.where(real, vectors + update, 0.0)
        update = self.mlp(self.norm(attend(self.attention, vectors, values, bonds)))
        return vectors, torch.where(real, values + update, 0.0)


class Gala(AbstractEnergyModel):
    """Gala energy model on padded point clouds.

    Args:
        num_species: one-hot width of ``point_features`` (atomic numbers 1..num_species);
            the pair input has ``2 * num_species`` numbers (200 in the paper).
        hidden: width of the bond values and of every network inside the attention.
        num_blocks: attention blocks before the pooling attention.
        rank: bonds per geometric product (2: pairs ``r_ij r_ik``; 3 costs ``M`` times more).
        merge_fun, join_fun: ``"concat"`` (learned kernels) or ``"mean"``, as in the package.
        invariant_mode, covariant_mode: ``"full"``, ``"partial"`` or ``"single"``: which
            geometric products give invariants (and, for equivariant blocks, vectors).
        include_normalized_products: also use the products divided by their norms.
        invariant_value_normalization: ``"momentum"`` (running per-invariant standardisation,
            masked) or ``"none"``.
        equivariant_value_normalization: ``"momentum_layer"`` (running mean norm, masked) or
            ``"none"``; used by equivariant blocks only.
        value_normalization, score_normalization, block_normalization: ``"layer"``
            (``LayerNorm`` inside the value and score networks and on each block's
            attention output) or ``"none"``.
        equivariant_attention: start every block with a rotation-equivariant update of the
            bond vectors.
        activation: ``"silu"`` (default) or ``"tanh"``; smooth, for continuous forces.
        momentum: momentum of the running statistics, in [0, 1).
    """

    representation = "point_cloud"

    def __init__(
        self,
        num_species: int = 100,
        hidden: int = 100,
        num_blocks: int = 3,
        rank: int = 2,
        merge_fun: str = "concat",
        join_fun: str = "concat",
        invariant_mode: str = "full",
        covariant_mode: str = "full",
        include_normalized_products: bool = False,
        invariant_value_normalization: str = "momentum",
        equivariant_value_normalization: str = "momentum_layer",
        value_normalization: str = "layer",
        score_normalization: str = "layer",
        block_normalization: str = "layer",
        equivariant_attention: bool = False,
        activation: str = "silu",
        momentum: float = 0.99,
    ):
        super().__init__()
        _check_choice("merge_fun", merge_fun, COMBINE)
        _check_choice("join_fun", join_fun, COMBINE)
        _check_choice("invariant_mode", invariant_mode, MODES)
        _check_choice("covariant_mode", covariant_mode, MODES)
        _check_choice("invariant_value_normalization", invariant_value_normalization, ("momentum", "none"))
        _check_choice("equivariant_value_normalization", equivariant_value_normalization, ("momentum_layer", "none"))
        for name, kind in (
            ("value_normalization", value_normalization),
            ("score_normalization", score_normalization),
            ("block_normalization", block_normalization),
        ):
            _check_choice(name, kind, ("layer", "none"))
        _check_choice("activation", activation, SMOOTH_ACTIVATIONS)
        if num_species < 1 or hidden < 1:
            raise ValueError(f"num_species and hidden must be positive, got {num_species} and {hidden}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if rank not in (2, 3):
            raise ValueError(f"rank must be 2 (bond pairs) or 3 (bond triplets), got {rank}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_species = num_species
        settings = _Settings(
            hidden,
            rank,
            merge_fun,
            join_fun,
            invariant_mode,
            covariant_mode,
            include_normalized_products,
            invariant_value_normalization,
            value_normalization,
            score_normalization,
            activation,
            momentum,
        )
        # the paper's symmetric one-hot input, [one_hot(i), one_hot(j)] -> hidden
        self.embedding = nn.Linear(2 * num_species, hidden)
        self.blocks = nn.ModuleList(
            GalaBlock(settings, equivariant_attention, equivariant_value_normalization, block_normalization)
            for _ in range(num_blocks)
        )
        self.pool = settings.invariant(reduce=True)
        self.species = nn.Linear(num_species, hidden, bias=False)
        self.output = nn.Sequential(nn.Linear(hidden, hidden), settings.act(), nn.Linear(hidden, 1))
        init_output_layer(self.output[-1])

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        """One-hot inputs: the pair embedding's columns are ``[Z_i, Z_j]`` (two species blocks), the
        species term's columns ``Z`` (:mod:`matsciml.models.species_axes`)."""
        return {"embedding.weight": SpeciesAxis(dim=1, blocks=2), "species.weight": SpeciesAxis(dim=1)}

    @property
    def input_dim(self) -> int:
        """Width of the symmetric one-hot pair input."""
        return 2 * self.num_species

    def energy(self, batch: Batch) -> torch.Tensor:
        # geometric-algebra-attention 0.5 contracts tensors with tensordot, which refuses the mixed
        # dtypes autocast produces: under mixed precision Gala runs in full precision
        with torch.autocast(device_type=batch.positions.device.type, enabled=False):
            return self._energy(batch)

    def _energy(self, batch: Batch) -> torch.Tensor:
        real = batch.point_mask  # (B, M)
        points = batch.positions[batch.point_index]  # (B, M, 3); padding slots gather atom 0
        features = batch.point_features.to(points.dtype)  # (B, M, S)
        if features.shape[-1] != self.num_species:
            raise ValueError(
                f"point_features have {features.shape[-1]} species; {type(self).__name__} was built "
                f"with num_species={self.num_species} (set num_species in the data module to match)"
            )
        num_points = points.shape[1]
        itself = torch.eye(num_points, dtype=torch.bool, device=points.device)
        bonds = real.unsqueeze(2) & real.unsqueeze(1) & ~itself  # (B, M_i, M_j): real bond i -> j
        # nearest periodic images, differentiable in positions and cell (forces and stress);
        # zero unreal bonds, so no gradient reaches atom 0 through the padding slots
        vectors = minimum_image_vectors(points, batch.cell, batch.pbc)
        vectors = torch.where(bonds.unsqueeze(-1), vectors, 0.0)
        # Linear([one_hot(i), one_hot(j)]) without building the (B, M, M, 2S) input
        centre_weight, neighbour_weight = self.embedding.weight.split(self.num_species, dim=1)
        values = (
            (features @ centre_weight.T).unsqueeze(2)
            + (features @ neighbour_weight.T).unsqueeze(1)
            + self.embedding.bias
        )
        values = torch.where(bonds.unsqueeze(-1), values, 0.0)
        for block in self.blocks:
            vectors, values = block(vectors, values, bonds)
        pooled = attend(self.pool, vectors, values, bonds)  # (B, M, H)
        pooled = torch.where(bonds.any(dim=-1, keepdim=True), pooled, 0.0)  # atoms without neighbours
        per_point = self.output(pooled + self.species(features)).squeeze(-1)
        return torch.where(real, per_point, 0.0).sum(dim=-1)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
