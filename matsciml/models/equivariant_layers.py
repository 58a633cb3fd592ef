"""Building blocks of E(3)-equivariant interatomic potentials (NequIP, MACE), on e3nn.

Features are e3nn irreps arrays: ``(num_atoms, irreps.dim)``, scalars ``0e`` first. An edge
``j -> i`` (``j, i = batch.edge_index``, ``i`` the centre) carries

* its spherical harmonics ``Y(r_ij)`` (:class:`EdgeAttributes`), the angular part, and
* ``bessel(|r_ij|) * envelope(|r_ij|)`` (:class:`BesselBasis`, :class:`PolynomialEnvelope`),
  the radial part, which an MLP (:func:`radial_mlp`) turns into per-edge weights.

:class:`Interaction` convolves neighbour features with ``Y`` through those weights and sums
onto the centre; :func:`gate_for` builds the gated nonlinearity that follows. Species enter
through :class:`SpeciesEmbedding` and :class:`SpeciesLinear` (self-connection), energies leave
through :class:`ScalarReadout` and :class:`PerSpeciesScaleShift`.
:func:`~matsciml.models.edge_pairs.undirected_pairs` lets the radial part run once per atom pair
instead of once per directed edge.

Parity: with ``parity=True`` the spherical harmonics are ``Y_l`` with parity ``(-1)^l`` and the
model is O(3)-equivariant (energies are also mirror-invariant). With ``parity=False`` every irrep
is labelled even (``0e + 1e + 2e ...``, e3nn reads the edge vector as a pseudovector): the model
is then only SO(3)-equivariant, so its energy may tell a structure from its mirror image, and
it has fewer paths (faster).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from matsciml.models import base as model_base
from matsciml.models.edge_pairs import undirected_pairs  # noqa: F401 (importable from its former home)
from matsciml.models.layers import OUTPUT_GAIN
from matsciml.models.neighbour_products import NeighbourTensorProduct
from matsciml.models.species_axes import SpeciesAxis


class BesselBasis(nn.Module):
    """``sqrt(2 / rc) * sin(n pi r / rc) / r`` for ``n = 1..num_basis`` (DimeNet's radial basis).

    Computed with ``sinc`` so it is finite (``sqrt(2/rc) n pi / rc``) at ``r = 0``.

    Args:
        cutoff: ``rc`` in Å.
        num_basis: number of functions.
        trainable: learn the frequencies ``n pi / rc`` (start there).

    Shapes:
        ``(num_edges,)`` distances -> ``(num_edges, num_basis)``.
    """

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = False):
        super().__init__()
        if cutoff <= 0 or num_basis < 1:
            raise ValueError(f"BesselBasis needs cutoff > 0 and num_basis >= 1, got {cutoff}, {num_basis}")
        self.cutoff = float(cutoff)
        self.prefactor = math.sqrt(2.0 / cutoff)
        frequencies = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * (math.pi / cutoff)
        if trainable:
            self.frequencies = nn.Parameter(frequencies)
        else:
            self.register_buffer("frequencies", frequencies)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        w = self.frequencies.to(distances.dtype)
        # sin(w r) / r == w * sinc(w r / pi), with torch.sinc(x) = sin(pi x) / (pi x)
        return self.prefactor * w * torch.sinc(distances.unsqueeze(-1) * (w / math.pi))


class PolynomialEnvelope(nn.Module):
    """``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``, ``x = r / rc``; 0 beyond ``rc``.

    1 at ``r = 0``; value, first and second derivative vanish at ``rc`` (C2 there), so energies,
    forces and their derivatives are continuous as neighbours cross the cutoff (Klicpera et al. 2020).

    Shapes:
        ``(num_edges,)`` -> ``(num_edges,)``.
    """

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        if cutoff <= 0 or p < 2:
            raise ValueError(f"PolynomialEnvelope needs cutoff > 0 and p >= 2, got {cutoff}, {p}")
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = distances / self.cutoff
        xp = x.pow(p)
        value = 1.0 - 0.5 * (p + 1) * (p + 2) * xp + p * (p + 2) * xp * x - 0.5 * p * (p + 1) * xp * x * x
        return value * (x < 1.0).to(value.dtype)


def sh_irreps(l_max: int, parity: bool = True) -> o3.Irreps:
    """Irreps of the edge spherical harmonics: ``0e+1o+2e...`` (parity) or ``0e+1e+2e...``."""
    if l_max < 0:
        raise ValueError(f"l_max must be >= 0, got {l_max}")
    return o3.Irreps([(1, (degree, (-1) ** degree if parity else 1)) for degree in range(l_max + 1)])


def hidden_irreps(num_features: int, l_max: int, parity: bool = True) -> o3.Irreps:
    """Features of every ``l <= l_max``: both parities when ``parity`` (nequip's convention), else even."""
    parities = (1, -1) if parity else (1,)
    return o3.Irreps([(num_features, (degree, p)) for degree in range(l_max + 1) for p in parities])


class EdgeAttributes(nn.Module):
    """Spherical harmonics of the edge vectors (normalised directions, ``component`` normalisation).

    Shapes:
        ``(num_edges, 3)`` -> ``(num_edges, irreps_out.dim)``.
    """

    def __init__(self, l_max: int, parity: bool = True):
        super().__init__()
        self.irreps_out = sh_irreps(l_max, parity)
        self.sh = o3.SphericalHarmonics(self.irreps_out, normalize=True, normalization="component")

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.sh(vectors)


def radial_mlp(num_basis: int, hidden: Iterable[int], num_out: int) -> e3nn_nn.FullyConnectedNet:
    """MLP (no biases, SiLU) from the enveloped radial basis to per-edge weights.

    Without biases, a zero input (an edge at the cutoff) gives zero weights: messages fade out
    as smoothly as the envelope.
    """
    return e3nn_nn.FullyConnectedNet([num_basis, *hidden, num_out], torch.nn.functional.silu)


def reachable(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, irreps_target: o3.Irreps) -> o3.Irreps:
    """The irreps of ``irreps_target`` that a tensor product of ``irreps_in`` and ``irreps_sh`` can reach."""
    products = {ir_out for _, ir_in in irreps_in for _, ir_sh in irreps_sh for ir_out in ir_in * ir_sh}
    return o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir in products])


def gate_for(irreps_hidden: o3.Irreps) -> e3nn_nn.Gate:
    """Gated nonlinearity whose output is ``irreps_hidden``.

    Scalars go through SiLU (even) or tanh (odd: an odd activation keeps the parity); each
    ``l > 0`` irrep is multiplied by a SiLU-activated even scalar gate. The layer before the
    gate must produce ``gate.irreps_in`` (``irreps_hidden`` plus the gates).
    """
    irreps_hidden = o3.Irreps(irreps_hidden).simplify()
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_hidden if ir.l > 0])
    silu, tanh = torch.nn.functional.silu, torch.tanh
    return e3nn_nn.Gate(
        scalars,
        [silu if ir.p == 1 else tanh for _, ir in scalars],
        o3.Irreps([(mul, "0e") for mul, _ in gated]),
        [silu] * len(gated),
        gated,
    )


class Interaction(nn.Module):
    """Tensor-product convolution: ``linear_2( sum_j TP(linear_1(x)_j, Y(r_ij); w(r_ij)) / sqrt(avg_nn) )``.

    ``TP`` has one "uvu" path per (feature irrep, harmonic, output irrep in ``irreps_out``) with
    per-edge weights ``w`` from :func:`radial_mlp`; there is no nonlinearity inside. A NequIP
    layer calls :meth:`forward`; a MACE layer may take :meth:`aggregate` (the summed messages in
    ``irreps_mid``, before ``linear_2``) to build its own atomic basis.

    Args:
        irreps_in: node features.
        irreps_sh: edge spherical harmonics.
        irreps_out: irreps of the output (e.g. a gate's ``irreps_in``).
        num_basis: radial basis size (input of the radial MLP).
        radial_hidden: hidden widths of the radial MLP.
        avg_num_neighbors: the sum over neighbours is divided by its square root.

    Shapes:
        ``x (num_atoms, irreps_in.dim)``, ``edge_sh (num_edges, irreps_sh.dim)``,
        ``edge_radial (num_edges, num_basis)`` (or ``(num_pairs, num_basis)`` with ``pair (num_edges,)``),
        ``edge_index (2, num_edges)`` -> ``(num_atoms, irreps_out.dim)``.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps | str,
        irreps_sh: o3.Irreps | str,
        irreps_out: o3.Irreps | str,
        num_basis: int,
        radial_hidden: Iterable[int] = (64, 64),
        avg_num_neighbors: float = 1.0,
    ):
        super().__init__()
        if not avg_num_neighbors > 0:
            raise ValueError(f"avg_num_neighbors must be positive, got {avg_num_neighbors}")
        self.irreps_in, self.irreps_sh = o3.Irreps(irreps_in), o3.Irreps(irreps_sh)
        self.irreps_out = o3.Irreps(irreps_out)
        # a buffer: a state dict loaded into a model built with another statistic restores the trained one
        self.register_buffer("neighbor_norm", torch.tensor(float(avg_num_neighbors) ** -0.5))
        self.linear_1 = o3.Linear(self.irreps_in, self.irreps_in)
        mid, instructions = [], []
        for i_in, (mul, ir_in) in enumerate(self.irreps_in):
            for i_sh, (_, ir_sh) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in self.irreps_out:
                        instructions.append((i_in, i_sh, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        if not mid:
            raise ValueError(f"no tensor-product path from {self.irreps_in} x {self.irreps_sh} to {self.irreps_out}")
        # sorted output irreps: linear_2 then sees each irrep type as one block
        irreps_mid, permutation, _ = o3.Irreps(mid).sort()
        instructions = [(a, b, permutation[c], mode, train) for a, b, c, mode, train in instructions]
        self.irreps_mid = irreps_mid
        self.tp = o3.TensorProduct(
            self.irreps_in, self.irreps_sh, irreps_mid, instructions, shared_weights=False, internal_weights=False
        )
        self.neighbour_tp = NeighbourTensorProduct(self.tp)  # the same sums, faster; self.tp: the reference
        self.radial = radial_mlp(num_basis, radial_hidden, self.tp.weight_numel)
        self.linear_2 = o3.Linear(irreps_mid.simplify(), self.irreps_out)

    def aggregate(
        self,
        x: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_radial: torch.Tensor,
        edge_index: torch.Tensor,
        pair: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Messages summed per centre and normalised, ``(num_atoms, irreps_mid.dim)``.

        With ``pair`` (from :func:`~matsciml.models.edge_pairs.undirected_pairs`), ``edge_radial``
        holds one row per pair ``(num_pairs, num_basis)`` and the radial MLP runs once per pair.
        """
        j, i = edge_index
        # the normalisation is linear: applied to the nodes, it costs num_atoms, not num_edges
        x = self.linear_1(x) * self.neighbor_norm.to(x.dtype)
        weights = self.radial(edge_radial)
        if pair is not None:
            weights = weights.index_select(0, pair)
        if not model_base._is_compiling():  # the padded layout's width is read from the data
            return self.neighbour_tp(x, edge_sh, weights, edge_index)
        # index_select, not x[j]: its backward is an index_add, where advanced indexing's sorts
        messages = self.tp(x.index_select(0, j), edge_sh, weights)
        return messages.new_zeros((x.shape[0], messages.shape[-1])).index_add(0, i, messages)

    def forward(
        self,
        x: torch.Tensor,
        edge_sh: torch.Tensor,
        edge_radial: torch.Tensor,
        edge_index: torch.Tensor,
        pair: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.linear_2(self.aggregate(x, edge_sh, edge_radial, edge_index, pair))


class SpeciesEmbedding(nn.Module):
    """Atomic number -> ``num_features x 0e`` (a one-hot of Z times a linear, as a lookup).

    Shapes:
        ``(num_atoms,)`` integers -> ``(num_atoms, num_features)``.
    """

    def __init__(self, num_species: int, num_features: int):
        super().__init__()
        self.irreps_out = o3.Irreps(f"{num_features}x0e")
        self.embedding = nn.Embedding(num_species + 1, num_features)  # unit-variance rows

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        return {"embedding.weight": SpeciesAxis(dim=0)}

    def forward(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.embedding(numbers)


class SpeciesLinear(nn.Module):
    """Equivariant linear map whose weights depend on the species of the atom (self-connection).

    The same map as nequip's ``FullyConnectedTensorProduct(x, one_hot(Z))``, but computed by
    gathering each atom's weight matrices, ``O(num_atoms * mul_in * mul_out)``, instead of
    contracting with a ``num_species``-wide one-hot. Only irreps in both ``irreps_in`` and
    ``irreps_out`` are connected; others of ``irreps_out`` are zero.

    Shapes:
        ``x (num_atoms, irreps_in.dim)``, ``numbers (num_atoms,)`` -> ``(num_atoms, irreps_out.dim)``.
    """

    def __init__(self, irreps_in: o3.Irreps | str, irreps_out: o3.Irreps | str, num_species: int):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in).simplify(), o3.Irreps(irreps_out).simplify()
        self.num_rows = num_species + 1
        self.weights = nn.ParameterList()
        # per output irrep: (input slice, mul_in, index into weights) or None (no input of that irrep)
        self.paths: list[tuple[slice, int, int] | None] = []
        in_slices = self.irreps_in.slices()
        for mul_out, ir_out in self.irreps_out:
            match = [k for k, (_, ir_in) in enumerate(self.irreps_in) if ir_in == ir_out]  # simplified: <= 1
            if not match:
                self.paths.append(None)
                continue
            mul_in = self.irreps_in[match[0]].mul
            self.paths.append((in_slices[match[0]], mul_in, len(self.weights)))
            # unit-variance weights, scaled by mul_in^-1/2 in forward: outputs keep the inputs' scale
            self.weights.append(nn.Parameter(torch.randn(num_species + 1, mul_in, mul_out)))

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        # num_species=0: one map shared by all species, without a species axis
        return {} if self.num_rows == 1 else {f"weights.{i}": SpeciesAxis(dim=0) for i in range(len(self.weights))}

    def forward(self, x: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        blocks = []
        for (mul_out, ir_out), path in zip(self.irreps_out, self.paths, strict=True):
            if path is None:
                blocks.append(x.new_zeros((x.shape[0], mul_out * ir_out.dim)))
                continue
            s_in, mul_in, index = path
            w = self.weights[index].index_select(0, numbers).to(x.dtype) * mul_in**-0.5
            block = torch.einsum("nud,nuw->nwd", x[:, s_in].reshape(-1, mul_in, ir_out.dim), w)
            blocks.append(block.reshape(-1, mul_out * ir_out.dim))
        return torch.cat(blocks, dim=-1)


def shrink_output(linear: o3.Linear, gain: float = OUTPUT_GAIN) -> None:
    """Start an e3nn linear small (``init_output_layer`` for ``o3.Linear``): an untrained model outputs ~0."""
    with torch.no_grad():
        linear.weight.mul_(gain)
        if linear.bias.numel():
            linear.bias.zero_()


class ScalarReadout(nn.Module):
    """Per-atom scalar from the ``0e`` part of the features: a linear, or an MLP with ``hidden`` units.

    Shapes:
        ``(num_atoms, irreps_in.dim)`` -> ``(num_atoms,)``.
    """

    def __init__(self, irreps_in: o3.Irreps | str, hidden: int | None = None):
        super().__init__()
        irreps_in = o3.Irreps(irreps_in)
        if hidden is None:
            self.hidden, self.activation = None, None
            self.output = o3.Linear(irreps_in, "0e")
        else:
            self.hidden = o3.Linear(irreps_in, f"{hidden}x0e")
            self.activation = torch.nn.SiLU()
            self.output = o3.Linear(f"{hidden}x0e", "0e")
        shrink_output(self.output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden is not None:
            x = self.activation(self.hidden(x))
        return self.output(x).squeeze(-1)


class PerSpeciesScaleShift(nn.Module):
    """``E_i <- scale[Z_i] * E_i + shift[Z_i]``, learnable, starting at 1 and 0.

    The task already normalises energies (shift, scale and per-element references), so these
    only refine that per species.

    Shapes:
        ``energies (num_atoms,)``, ``numbers (num_atoms,)`` -> ``(num_atoms,)``.
    """

    def __init__(self, num_species: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_species + 1))
        self.shift = nn.Parameter(torch.zeros(num_species + 1))

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        return {"scale": SpeciesAxis(dim=0), "shift": SpeciesAxis(dim=0)}

    def forward(self, energies: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale.index_select(0, numbers), self.shift.index_select(0, numbers)
        return scale.to(energies.dtype) * energies + shift.to(energies.dtype)
