"""MACE's symmetric contraction: higher body order from products of the atomic basis.

Batatia et al. (2022, eq. 10-11) build, per atom ``i`` and channel ``k``, the B-basis

    B^{(nu)}_{i k eta LM} = sum_{l_1 m_1 ... l_nu m_nu} C^{LM}_{eta, l_1 m_1 ... l_nu m_nu} prod_t A_{i k l_t m_t}

from ``nu`` copies of the same A-features, with generalised Clebsch-Gordan coefficients ``C`` that
are symmetric in the copies, and mix it with species-dependent weights:

    m_{i k LM} = sum_{nu <= correlation} sum_eta W^{(nu)}_{z_i k eta L} B^{(nu)}_{i k eta LM}.

The coefficients are built here from e3nn's ``wigner_3j``: couple one more copy of A at a time
(``(nu - 1)``-fold states x A -> ``L``), symmetrise over the copies, and keep an orthonormal basis
of the span (SVD), so every independent symmetric coupling appears once. Because the tensor is
symmetric, it is stored on the unique monomials ``A_{i_1} ... A_{i_nu}`` with ``i_1 <= ... <= i_nu``
(816 instead of 4096 entries for ``nu = 3`` and l_max 3): the forward pass is a gather-multiply of
A into monomials and one matrix product, with no Python loop over atoms or paths.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from e3nn import o3
from torch import nn

from matsciml.models.species_axes import SpeciesAxis

#: singular values below this fraction of the largest one are linear dependencies of the couplings
_RANK_TOLERANCE = 1e-9


def _symmetrise(tensor: torch.Tensor, nu: int) -> torch.Tensor:
    """Average ``(paths, d x nu, M)`` over the permutations of its ``nu`` copy axes."""
    permutations = list(itertools.permutations(range(1, nu + 1)))
    total = sum(tensor.permute(0, *order, nu + 1) for order in permutations)
    return total / len(permutations)


def _orthonormal_span(tensor: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows, unit Frobenius norm) of the span of ``tensor``'s rows."""
    flat = tensor.reshape(tensor.shape[0], -1)
    _, singular, basis = torch.linalg.svd(flat, full_matrices=False)
    rank = int((singular > _RANK_TOLERANCE * singular[0]).sum()) if len(singular) and singular[0] > 0 else 0
    return basis[:rank].reshape(rank, *tensor.shape[1:])


def _irrep_blocks(irreps: o3.Irreps) -> list[tuple[o3.Irrep, slice]]:
    """Each single irrep of ``irreps`` (multiplicities expanded) with its slice."""
    blocks, start = [], 0
    for mul, ir in irreps:
        for _ in range(mul):
            blocks.append((ir, slice(start, start + ir.dim)))
            start += ir.dim
    return blocks


@functools.cache
def coupling_basis(irreps_in: str, irreps_out: str, correlation: int) -> dict[int, dict[str, torch.Tensor]]:
    """Symmetric generalised Clebsch-Gordan coefficients, for ``nu = 1 .. correlation``.

    Args:
        irreps_in: the irreps of one channel of A, e.g. ``"0e+1o+2e+3o"``.
        irreps_out: the irreps of one channel of the output, e.g. ``"0e+1o"`` (each at most once).
        correlation: the highest number of copies of A multiplied together.

    Returns:
        ``{nu: {str(irrep): U}}`` for each output irrep that ``nu`` copies reach, with ``U`` of shape
        ``(paths, d, ..., d, 2L + 1)`` (``nu`` axes of ``d = dim(irreps_in)``), symmetric in the ``d``
        axes, rows orthonormal; float64. Cached: the same irreps are built once per process.
    """
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    dim, blocks = irreps_in.dim, _irrep_blocks(irreps_in)
    max_l_in, max_l_out = irreps_in.lmax, irreps_out.lmax
    embeddings = []  # (d, 2l+1): places one irrep of A inside the d components
    for ir, block in blocks:
        embedding = torch.zeros(dim, ir.dim, dtype=torch.float64)
        embedding[block] = torch.eye(ir.dim, dtype=torch.float64)
        embeddings.append((ir, embedding))
    states: dict[o3.Irrep, torch.Tensor] = {}  # nu = 1: A's own irreps
    for ir, embedding in embeddings:
        states[ir] = torch.cat([states[ir], embedding[None]]) if ir in states else embedding[None]
    states = {ir: _orthonormal_span(tensor) for ir, tensor in states.items()}
    result = {1: {str(ir): states[ir] for ir in states if ir in irreps_out}}
    for nu in range(2, correlation + 1):
        # an intermediate L that the remaining copies cannot bring back down to the outputs is dropped
        reach = max_l_out + (correlation - nu) * max_l_in
        grown: dict[o3.Irrep, list[torch.Tensor]] = {}
        for ir_state, state in states.items():
            for ir_new, embedding in embeddings:
                for ir_out in ir_state * ir_new:
                    if ir_out.l > reach or (nu == correlation and ir_out not in irreps_out):
                        continue
                    w3j = o3.wigner_3j(ir_state.l, ir_new.l, ir_out.l, dtype=torch.float64)
                    grown.setdefault(ir_out, []).append(torch.einsum("p...a,xb,abc->p...xc", state, embedding, w3j))
        states = {}
        for ir, tensors in grown.items():
            span = _orthonormal_span(_symmetrise(torch.cat(tensors), nu))
            if len(span):
                states[ir] = span
        result[nu] = {str(ir): states[ir] for ir in states if ir in irreps_out}
    return result


class SymmetricContraction(nn.Module):
    """Channel-wise symmetric contraction of A-features with per-species weights.

    Channel ``k`` of the output depends only on channel ``k`` of the input (MACE's channel-wise
    structure); every input and output irrep has the same multiplicity, the number of channels.

    Args:
        irreps_in: A-features, e.g. ``"32x0e+32x1o+32x2e+32x3o"``.
        irreps_out: outputs, e.g. ``"32x0e+32x1o"`` (inner layers) or ``"32x0e"`` (last layer).
        correlation: most copies of A in a product (1 to 3 in MACE, body order up to 4; more works, slowly).
        num_species: rows of the weight tables (species indices 0 .. num_species - 1).

    Shapes:
        features: ``(num_atoms, irreps_in.dim)`` in e3nn's layout (per irrep: channel-major).
        species: ``(num_atoms,)`` integer indices into the weight tables.
        returns: ``(num_atoms, irreps_out.dim)``.
    """

    def __init__(self, irreps_in: str, irreps_out: str, correlation: int, num_species: int):
        super().__init__()
        irreps_in, irreps_out = o3.Irreps(irreps_in).simplify(), o3.Irreps(irreps_out).simplify()
        if correlation < 1:
            raise ValueError(f"correlation must be at least 1, got {correlation}")
        channels = {mul for mul, _ in irreps_in} | {mul for mul, _ in irreps_out}
        if len(channels) != 1:
            raise ValueError(
                f"every irrep of irreps_in ({irreps_in}) and irreps_out ({irreps_out}) needs the same "
                "multiplicity (the number of channels): the contraction is channel-wise"
            )
        self.irreps_in, self.irreps_out, self.correlation = irreps_in, irreps_out, correlation
        self.channels = channels.pop()
        per_channel_in = "+".join(str(ir) for _, ir in irreps_in)
        basis = coupling_basis(per_channel_in, "+".join(str(ir) for _, ir in irreps_out), correlation)
        unreached = [str(ir) for _, ir in irreps_out if not any(str(ir) in basis[nu] for nu in basis)]
        if unreached:
            raise ValueError(f"no product of up to {correlation} copies of {per_channel_in} gives {unreached}")
        self.paths = [[len(basis[nu].get(str(ir), ())) for _, ir in irreps_out] for nu in range(1, correlation + 1)]
        dim = irreps_in.dim // self.channels
        levels = [self._monomial_coefficients(basis[nu], irreps_out, dim, nu) for nu in range(1, correlation + 1)]
        # a degree-nu monomial is a degree-(nu-1) one times one more component: keep, at each degree,
        # the monomials with a coefficient and those that higher degrees are built from
        keep = [matrix.abs().amax(dim=1) > 1e-12 for _, matrix in levels]
        for nu in range(correlation, 1, -1):
            combos, _ = levels[nu - 1]
            row_of = {tuple(c): r for r, c in enumerate(levels[nu - 2][0].tolist())}
            for prefix in combos[keep[nu - 1], :-1].tolist():
                keep[nu - 2][row_of[tuple(prefix)]] = True
        previous: dict[tuple[int, ...], int] = {}
        for nu, ((combos, matrix), kept) in enumerate(zip(levels, keep, strict=True), start=1):
            combos = combos[kept]
            prefix = [previous[tuple(c[:-1])] for c in combos.tolist()] if nu > 1 else [0] * len(combos)
            self.register_buffer(f"prefix_{nu}", torch.tensor(prefix, dtype=torch.long), persistent=False)
            self.register_buffer(f"last_{nu}", combos[:, -1].clone(), persistent=False)
            # float64 whatever the default dtype: a model built in float32 and then made .double() keeps
            # exact coefficients (equivariance to 1e-12, not 1e-7); .float() rounds them as it should
            self.register_buffer(f"coefficients_{nu}", matrix[kept], persistent=False)
            previous = {tuple(c): r for r, c in enumerate(combos.tolist())}
        # one weight table per output irrep, over the paths of every nu; the 1/sqrt(paths) keeps the
        # output's scale independent of how many couplings there are
        self.weights = nn.ParameterList()
        for position in range(len(irreps_out)):
            paths = sum(per_nu[position] for per_nu in self.paths)
            self.weights.append(nn.Parameter(torch.randn(num_species, self.channels, paths) / math.sqrt(paths)))

    @staticmethod
    def _monomial_coefficients(
        basis: dict[str, torch.Tensor], irreps_out: o3.Irreps, dim: int, nu: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric tensors on the sorted monomials: ``combos (monomials, nu)``, ``(monomials, columns)``.

        A symmetric ``U[i_1..i_nu]`` contracts with ``A^(x nu)`` as the sum over sorted index tuples of
        ``(number of distinct orderings) * U[sorted] * prod A``.
        """
        combos = torch.tensor(list(itertools.combinations_with_replacement(range(dim), nu)), dtype=torch.long)
        orderings = torch.tensor(
            [math.factorial(nu) / math.prod(math.factorial(c) for c in torch.bincount(row).tolist()) for row in combos],
            dtype=torch.float64,
        )
        columns = []
        for _, ir in irreps_out:
            tensor = basis.get(str(ir))
            if tensor is None:
                continue
            # component normalisation: each of the 2L+1 components of a unit-norm path ~ 1 in size
            picked = tensor[(slice(None), *combos.T)] * math.sqrt(ir.dim)  # (paths, monomials, 2L+1)
            columns.append(picked.permute(1, 0, 2).reshape(len(combos), -1))
        return combos, torch.cat(columns, dim=1) * orderings[:, None]

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        """Rows of every weight table are species indices (:mod:`matsciml.models.species_axes`);
        a table of one row is shared by all species, so it has no species axis."""
        if self.weights[0].shape[0] == 1:
            return {}
        return {f"weights.{i}": SpeciesAxis(dim=0) for i in range(len(self.weights))}

    def forward(self, features: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        num_atoms = features.shape[0]
        per_channel = [
            features[:, block].reshape(num_atoms, self.channels, ir.dim)
            for (_, ir), block in zip(self.irreps_in, self.irreps_in.slices(), strict=True)
        ]
        # components first, (d, atoms * channels): gathering whole rows (and scattering them back in
        # the backward pass) is a contiguous copy, several times faster than indexing the last axis
        a = torch.cat(per_channel, dim=-1).reshape(num_atoms * self.channels, -1).t().contiguous()
        parts: list[list[torch.Tensor]] = [[] for _ in self.irreps_out]  # per output irrep, B of each nu
        monomials = a
        for nu in range(1, self.correlation + 1):
            coefficients = getattr(self, f"coefficients_{nu}")
            last = a.index_select(0, getattr(self, f"last_{nu}"))  # (monomials, atoms * channels)
            monomials = last if nu == 1 else monomials.index_select(0, getattr(self, f"prefix_{nu}")) * last
            b = (coefficients.to(a.dtype).t() @ monomials).t().reshape(num_atoms, self.channels, -1)
            start = 0
            for position, (_, ir) in enumerate(self.irreps_out):
                width = self.paths[nu - 1][position] * ir.dim
                if width:
                    parts[position].append(b[..., start : start + width].reshape(num_atoms, self.channels, -1, ir.dim))
                start += width
        outputs = []
        for position, weight in enumerate(self.weights):
            b = torch.cat(parts[position], dim=2)  # (atoms, channels, paths, 2L+1)
            mixed = torch.einsum("nkpm,nkp->nkm", b, weight[species])
            outputs.append(mixed.reshape(num_atoms, -1))
        return torch.cat(outputs, dim=-1)
