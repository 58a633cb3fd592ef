"""MEGNet: MatErials Graph Network (Chen, Ye, Zuo, Zheng and Ong, 2019).

A MEGNet graph carries features on atoms (``v``), on directed edges (``e``) and one global
state per structure (``u``). Each of the ``num_blocks`` blocks passes all three through
dense pre-layers and then updates them in turn,

* edges: ``e_ij <- phi_e(v_i, v_j, e_ij, u)``,
* atoms: ``v_i <- phi_v(v_i, mean_j e_ij, u)`` over the edges arriving at centre ``i``,
* state: ``u <- phi_u(mean e, mean v, u)`` over the edges and atoms of the structure,

with dropout on the updates and a residual connection around every block: the update is
added to the block's input or, in the first block, whose raw inputs are narrower, to the
output of its dense pre-layers (in the paper dense layers precede the first block and every
block has a skip connection, which comes to the same). Atoms start from a learned
atomic-number embedding, edges from a Gaussian expansion of the edge length computed in
the forward pass from :meth:`~AbstractEnergyModel.edge_vectors` (so forces
``-dE/dx`` see every path through the geometry), and the state from a learned vector
shared by all structures. Set2Set readouts over atoms and over edges are concatenated with
the state and fed to an output MLP. Aggregations are vectorised with ``index_add`` over the
whole batch.

Departures from the paper, each for smooth, extensive energies and forces:

* **Extensive energy.** Set2Set, the means and therefore the head are intensive: a 2x2x1
  supercell gives exactly the same head output as its unit cell. The head is read as an
  energy per atom and the structure's energy is ``natoms * head(...)``, so a supercell's
  energy is ``n`` times the cell's and its per-atom forces are the same. (The paper fits
  intensive targets such as formation energy per atom, where this question does not arise.)
* **Continuity at the cutoff.** An edge entering the radius graph must change nothing.
  Scaling the Gaussian features by :meth:`~AbstractEnergyModel.cosine_cutoff` is not enough
  on its own: ``phi_e`` of a zero vector is not zero, and plain means count the new edge.
  So every aggregation over edges is weighted by the envelope ``w_ij``: the per-structure
  edge mean is ``sum w e / sum w`` (numerator and denominator both grow n-fold in a
  supercell, so the state stays intensive), the Set2Set attention over edges is
  ``w exp(s) / sum w exp(s)``, and the per-centre mean is
  ``sum_j w_ij e_ij / (1 + sum_j w_ij)``. The ``1 +`` makes the latter go smoothly to zero
  when an atom loses its last neighbour, where ``sum w e / sum w`` would jump; for
  coordinated atoms it is close to the weighted mean (``sum w`` is 4-15, median 10, on the
  S2EF devset at 6 Å).
* **Distance expansion.** The Open MatSci ML Toolkit's MEGNet (its Table 4) took 2 edge
  input features, too coarse a description of a distance for a potential; this model uses
  the original paper's expansion instead, 100 Gaussians ``exp(-(r - mu)^2 / 0.5^2)``, but
  with centres from 0 to the cutoff rather than to 5 Å (``num_gaussians``,
  ``gaussian_width``).
* **No state input.** OC20-style data carries no global state, so the initial state is a
  learned vector of width ``state_dim`` shared by every structure.

The activation is the paper's shifted softplus ``log(1 + e^x) - log 2`` by default; it is
smooth, so forces are continuous; ``"silu"`` is the alternative. Linear layers start from
Glorot-uniform weights and zero biases (Keras's default, which the reference
implementation used): with PyTorch's default (a third of the variance) the distance signal
fades through the ~20 layers and the initial forces come out some 50 times smaller.
The last layer then starts at a hundredth of that (:func:`~matsciml.models.layers.init_output_layer`),
so an untrained model predicts the normaliser's baseline; Adam's steps do not shrink with it.

Other defaults follow the Open MatSci ML Toolkit paper's Table 4: node embedding 5, state 9,
4 blocks, dense pre-layers [128, 64], update MLPs [128, 128, 64], Set2Set with 5 LSTM layers
and 4 steps, output MLP [64, 16], dropout 0.1; about 1.2 M parameters (the paper's MEGNet had
about 1 M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from matsciml.data.batch import Batch
from matsciml.models.base import AbstractEnergyModel
from matsciml.models.layers import check_activation, init_output_layer, mlp
from matsciml.models.species_axes import SpeciesAxis

#: smooth activations only: forces are derivatives of the energy
SMOOTH_ACTIVATIONS = ("softplus", "silu")


def segment_softmax(
    logits: torch.Tensor, index: torch.Tensor, num_segments: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax of ``logits`` within each segment ``index``, optionally weighted.

    Returns ``a_k = w_k exp(s_k) / sum_{l in seg(k)} w_l exp(s_l)`` (``w = 1`` when
    ``weights`` is None), so each non-empty segment's values sum to one and elements with
    zero weight get none. The per-segment maximum that keeps ``exp`` finite is detached:
    the result does not depend on it.

    Shapes:
        logits, index, weights: ``(K,)``; returns ``(K,)``.
    """
    masked = logits.detach()
    if weights is not None:
        masked = masked.masked_fill(weights <= 0, -math.inf)
    shift = logits.new_full((num_segments,), -math.inf).scatter_reduce(0, index, masked, "amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    numerator = torch.exp(logits - shift[index])
    if weights is not None:
        numerator = numerator * weights
    denominator = numerator.new_zeros(num_segments).index_add(0, index, numerator)
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / denominator[index]


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals, Bengio and Kudlur, 2016), vectorised over segments.

    For ``steps`` iterations an LSTM turns the previous readout ``q*`` into a query ``q``;
    elements attend to it by ``softmax(x_k . q)`` within their segment, and
    ``q* = [q, sum_k a_k x_k]``. The result is invariant to the order of elements and, since
    the attention is normalised, to repeating every element of a segment ``n`` times.

    Args:
        width: width of the elements; the output is ``2 * width``.
        num_layers: stacked LSTM layers.
        steps: attention iterations.
    """

    def __init__(self, width: int, num_layers: int, steps: int):
        super().__init__()
        self.width = width
        self.steps = steps
        self.lstm = nn.LSTM(2 * width, width, num_layers=num_layers)

    def forward(
        self, x: torch.Tensor, index: torch.Tensor, num_segments: int, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Readout ``(num_segments, 2 * width)`` of elements ``x`` ``(K, width)`` in segments ``index``."""
        if x.device.type == "cpu":
            # oneDNN has no reduced-precision LSTM on many CPUs ("could not create a primitive descriptor
            # for the LSTM forward propagation primitive" under bf16 autocast): on CPU the readout runs in
            # (at least) float32 with autocast off; it is a few small matrix products per structure
            with torch.autocast("cpu", enabled=False):
                dtype = torch.promote_types(x.dtype, torch.float32)
                return self._readout(x.to(dtype), index, num_segments, None if weights is None else weights.to(dtype))
        return self._readout(x, index, num_segments, weights)

    def _readout(
        self, x: torch.Tensor, index: torch.Tensor, num_segments: int, weights: torch.Tensor | None
    ) -> torch.Tensor:
        layers = self.lstm.num_layers
        state = (x.new_zeros(layers, num_segments, self.width), x.new_zeros(layers, num_segments, self.width))
        q_star = x.new_zeros(num_segments, 2 * self.width)
        for _ in range(self.steps):
            # cuDNN's RNN kernel has no double backward, which force training needs; the
            # native kernels do, and a one-step LSTM on a few structures gains nothing from cuDNN.
            with torch.backends.cudnn.flags(enabled=False):
                query, state = self.lstm(q_star.unsqueeze(0), state)
            query = query.squeeze(0)
            attention = segment_softmax((x * query[index]).sum(-1), index, num_segments, weights)
            weighted = attention.unsqueeze(-1) * x
            readout = weighted.new_zeros(num_segments, self.width).index_add(0, index, weighted)
            q_star = torch.cat([query, readout], dim=-1)
        return q_star


class MegNetBlock(nn.Module):
    """Dense pre-layers on edges, atoms and state, then the edge, atom and state updates."""

    def __init__(
        self,
        edge_in: int,
        node_in: int,
        state_in: int,
        dense_sizes: Sequence[int],
        conv_sizes: Sequence[int],
        activation: str,
        dropout: float,
    ):
        super().__init__()
        d = dense_sizes[-1]
        self.edge_dense = mlp([edge_in, *dense_sizes], activation, last_activation=True)
        self.node_dense = mlp([node_in, *dense_sizes], activation, last_activation=True)
        self.state_dense = mlp([state_in, *dense_sizes], activation, last_activation=True)
        width = conv_sizes[-1]
        self.phi_e = mlp([4 * d, *conv_sizes], activation, last_activation=True)
        self.phi_v = mlp([2 * d + width, *conv_sizes], activation, last_activation=True)
        self.phi_u = mlp([d + 2 * width, *conv_sizes], activation, last_activation=True)
        self.dropout = nn.Dropout(dropout)
        # add the update to the block's input where widths allow, else to the pre-layers' output
        self.residual = (edge_in, node_in, state_in) == (width, width, width)

    def forward(
        self, v: torch.Tensor, e: torch.Tensor, u: torch.Tensor, graph: _Graph
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j, i = graph.edge_index
        v_d, e_d, u_d = self.node_dense(v), self.edge_dense(e), self.state_dense(u)
        w = graph.weights.unsqueeze(-1)
        e_new = self.phi_e[1:](self._phi_e_first_layer(v_d, e_d, u_d, graph))
        # per-centre mean of the incoming edges, weighted by the envelope (module docstring)
        w_e = w * e_new  # zeros in the sum's dtype: under autocast e_new is bf16, w float32
        to_centre = w_e.new_zeros(v.shape[0], e_new.shape[-1]).index_add(0, i, w_e)
        v_new = self.phi_v(torch.cat([v_d, to_centre / graph.centre_norm, u_d[graph.structure_index]], dim=-1))
        edge_mean = w_e.new_zeros(u.shape[0], e_new.shape[-1]).index_add(0, graph.edge_structure, w_e)
        node_mean = v_new.new_zeros(u.shape[0], v_new.shape[-1]).index_add(0, graph.structure_index, v_new)
        u_new = self.phi_u(torch.cat([edge_mean / graph.edge_norm, node_mean / graph.node_norm, u_d], dim=-1))
        e_new, v_new, u_new = self.dropout(e_new), self.dropout(v_new), self.dropout(u_new)
        if self.residual:
            return v + v_new, e + e_new, u + u_new
        return v_d + v_new, e_d + e_new, u_d + u_new

    def _phi_e_first_layer(
        self, v_d: torch.Tensor, e_d: torch.Tensor, u_d: torch.Tensor, graph: _Graph
    ) -> torch.Tensor:
        """``Linear(cat[v_i, v_j, e_ij, u])`` without building the ``(E, 4d)`` concatenation.

        The atom and state parts of the weight act on the (few) atoms and structures and are
        gathered per edge afterwards, which saves three quarters of the layer's per-edge work.
        """
        j, i = graph.edge_index
        first = self.phi_e[0]
        d = e_d.shape[-1]
        w_centre, w_neighbour, w_edge, w_state = first.weight.split(d, dim=1)
        centre, neighbour = (v_d @ torch.cat([w_centre, w_neighbour]).T).chunk(2, dim=-1)
        state = nn.functional.linear(u_d, w_state, first.bias)
        return centre[i] + neighbour[j] + e_d @ w_edge.T + state[graph.edge_structure]


class _Graph:
    """Indices and normalisers shared by every block of one forward pass."""

    __slots__ = ("centre_norm", "edge_index", "edge_norm", "edge_structure", "node_norm", "structure_index", "weights")

    def __init__(self, batch: Batch, weights: torch.Tensor):
        dtype = weights.dtype
        self.edge_index = batch.edge_index
        self.structure_index = batch.structure_index
        self.edge_structure = batch.structure_index[batch.edge_index[1]]
        self.weights = weights
        per_centre = weights.new_zeros(batch.num_atoms).index_add(0, batch.edge_index[1], weights)
        self.centre_norm = (1.0 + per_centre).unsqueeze(-1)
        per_structure = weights.new_zeros(batch.num_structures).index_add(0, self.edge_structure, weights)
        self.edge_norm = torch.where(per_structure > 0, per_structure, torch.ones_like(per_structure)).unsqueeze(-1)
        self.node_norm = batch.natoms.to(dtype).clamp(min=1).unsqueeze(-1)


def _check_sizes(name: str, sizes: Sequence[int]) -> list[int]:
    sizes = list(sizes)
    if not sizes or any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {sizes}")
    return [int(s) for s in sizes]


class MegNet(AbstractEnergyModel):
    """MEGNet energy model on periodic radius graphs (see the module docstring).

    Args:
        node_dim: width of the atomic-number embedding (the atoms' input features).
        state_dim: width of the learned initial global state.
        num_gaussians: Gaussians in the distance expansion (the edges' input features).
        gaussian_width: width ``sigma`` in Å of ``exp(-(r - mu)^2 / sigma^2)``.
        num_blocks: MEGNet blocks.
        dense_sizes: sizes of the dense pre-layers applied to edges, atoms and state in
            each block.
        conv_sizes: sizes of the update MLPs ``phi_e``, ``phi_v``, ``phi_u``; the last is the
            feature width between blocks and must equal ``dense_sizes[-1]``.
        set2set_layers, set2set_steps: LSTM layers and attention iterations of the readouts.
        output_sizes: hidden sizes of the output MLP (which ends in one per-atom energy).
        dropout: dropout probability on the block updates (training only).
        activation: ``"softplus"`` (shifted, the paper's; default) or ``"silu"``.
        cutoff: interaction radius in Å (edge contributions fade to zero there).
        num_species: size of the atomic-number embedding (Z from 1 to num_species).
    """

    def __init__(
        self,
        node_dim: int = 5,
        state_dim: int = 9,
        num_gaussians: int = 100,
        gaussian_width: float = 0.5,
        num_blocks: int = 4,
        dense_sizes: Sequence[int] = (128, 64),
        conv_sizes: Sequence[int] = (128, 128, 64),
        set2set_layers: int = 5,
        set2set_steps: int = 4,
        output_sizes: Sequence[int] = (64, 16),
        dropout: float = 0.1,
        activation: str = "softplus",
        cutoff: float = 6.0,
        num_species: int = 100,
    ):
        super().__init__(cutoff=cutoff)
        check_activation(activation, SMOOTH_ACTIVATIONS)
        for name, value in (
            ("node_dim", node_dim),
            ("state_dim", state_dim),
            ("num_gaussians", num_gaussians),
            ("num_blocks", num_blocks),
            ("set2set_layers", set2set_layers),
            ("set2set_steps", set2set_steps),
            ("num_species", num_species),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if not gaussian_width > 0:
            raise ValueError(f"gaussian_width must be positive, got {gaussian_width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dense_sizes = _check_sizes("dense_sizes", dense_sizes)
        conv_sizes = _check_sizes("conv_sizes", conv_sizes)
        if dense_sizes[-1] != conv_sizes[-1]:
            raise ValueError(
                f"dense_sizes[-1] ({dense_sizes[-1]}) must equal conv_sizes[-1] ({conv_sizes[-1]}):"
                " the first block's residual connection adds the two"
            )
        output_sizes = list(output_sizes)
        if any(int(s) != s or s < 1 for s in output_sizes):
            raise ValueError(f"output_sizes must be positive integers, got {output_sizes}")

        self.num_species = num_species
        self.gaussian_width = gaussian_width
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_gaussians))
        self.embedding = nn.Embedding(num_species + 1, node_dim)
        self.initial_state = nn.Parameter(torch.randn(state_dim))
        width = conv_sizes[-1]
        self.blocks = nn.ModuleList()
        edge_in, node_in, state_in = num_gaussians, node_dim, state_dim
        for _ in range(num_blocks):
            self.blocks.append(MegNetBlock(edge_in, node_in, state_in, dense_sizes, conv_sizes, activation, dropout))
            edge_in = node_in = state_in = width
        self.node_readout = Set2Set(width, set2set_layers, set2set_steps)
        self.edge_readout = Set2Set(width, set2set_layers, set2set_steps)
        self.output = mlp([5 * width, *output_sizes, 1], activation)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        init_output_layer(self.output[-1])

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        """The embedding's rows are atomic numbers (:mod:`matsciml.models.species_axes`)."""
        return {"embedding.weight": SpeciesAxis(dim=0)}

    def energy(self, batch: Batch) -> torch.Tensor:
        numbers = batch.atomic_numbers
        self.check_species(numbers)
        distances = self.edge_vectors(batch).norm(dim=-1)
        envelope = self.cosine_cutoff(distances, self.cutoff)
        centres = self.centres.to(distances.dtype)
        e = torch.exp(-(((distances.unsqueeze(-1) - centres) / self.gaussian_width) ** 2)) * envelope.unsqueeze(-1)
        v = self.embedding(numbers).to(distances.dtype)
        u = self.initial_state.to(distances.dtype).expand(batch.num_structures, -1)
        graph = _Graph(batch, envelope)
        for block in self.blocks:
            v, e, u = block(v, e, u, graph)
        nodes = self.node_readout(v, batch.structure_index, batch.num_structures)
        edges = self.edge_readout(e, graph.edge_structure, batch.num_structures, weights=envelope)
        per_atom = self.output(torch.cat([nodes, edges, u], dim=-1)).squeeze(-1)
        return batch.natoms.to(per_atom.dtype) * per_atom
