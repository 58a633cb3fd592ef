"""The "uvu" tensor-product convolution, summed over neighbours as per-atom matrix products.

:class:`~matsciml.models.equivariant_layers.Interaction` computes, for every centre ``i`` and path
``(l_1, l_2) -> l_3`` of an e3nn ``TensorProduct`` with ``uvu`` instructions,

    out_{i u k} = c_path sum_{j} w_{ij u} sum_{a b} C_{a b k} x_{j u a} Y_{ij b}

(``C`` the Wigner 3j symbol, ``c_path`` e3nn's path weight). e3nn evaluates the product edge by
edge, materialising ``num_edges x mul x (2 l_3 + 1)`` per path and as much again in each backward
pass of a force-training step, and only then sums onto the centres. Here the sum over neighbours
comes first: with each centre's edges laid out in a padded ``(num_atoms, width, .)`` block,

    M_{i u a b} = sum_j (w_{ij u} x_{j u a}) Y_{ij b}

is one batched matrix product per harmonic ``l_2``, and ``C`` is applied to ``M`` per atom. The
per-edge tensors are then only ``mul x (2 l_1 + 1)`` wide. The result equals e3nn's to rounding
(tested); the padding costs ``width / mean neighbours`` (about 1.5 on radius graphs) in the
matrix products only. ``width`` is read from the data, so traced or compiled code takes e3nn's path.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn


def padded_slots(centres: torch.Tensor, num_atoms: int) -> tuple[torch.Tensor, int]:
    """Each edge's row in a ``(num_atoms * width)`` layout that gives every centre ``width`` rows.

    Returns:
        ``slots (num_edges,)``: ``centre * width + rank`` of the edge among its centre's edges
        (in edge order); ``width``: the largest number of edges of one centre.
    """
    counts = torch.bincount(centres, minlength=num_atoms)
    width = int(counts.max())
    order = torch.argsort(centres, stable=True)
    first = torch.cumsum(counts, 0) - counts  # row of each centre's first edge in sorted order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(centres.numel(), device=centres.device) - first.index_select(0, centres[order])
    return centres * width + rank, width


def _pad(values: torch.Tensor, slots: torch.Tensor, num_atoms: int, width: int) -> torch.Tensor:
    """``(num_edges, F)`` -> ``(num_atoms, width, F)``, zeros where a centre has fewer edges."""
    padded = values.new_zeros((num_atoms * width, values.shape[-1])).index_copy(0, slots, values)
    return padded.view(num_atoms, width, values.shape[-1])


class NeighbourTensorProduct(nn.Module):
    """Sum over neighbours of an e3nn ``uvu`` tensor product with per-edge weights, by matrix products.

    Built from the ``TensorProduct`` it replaces (``shared_weights=False``, one copy of each
    harmonic in ``irreps_in2``); same weights layout and output layout.

    Shapes:
        ``x (num_atoms, irreps_in1.dim)`` (features of the sources), ``edge_sh (num_edges, irreps_in2.dim)``,
        ``weights (num_edges, weight_numel)``, ``edge_index (2, num_edges)`` -> ``(num_atoms, irreps_out.dim)``.
    """

    def __init__(self, tp: o3.TensorProduct):
        super().__init__()
        if tp.shared_weights or any(mul != 1 for mul, _ in tp.irreps_in2):
            raise ValueError("NeighbourTensorProduct needs per-edge weights and one copy of each harmonic")
        self.irreps_in1, self.irreps_in2, self.irreps_out = tp.irreps_in1, tp.irreps_in2, tp.irreps_out
        # per harmonic: the paths through it as (input irrep, weight slice, output irrep, 3j buffer)
        by_harmonic: dict[int, list[tuple[int, slice, int, str]]] = {}
        start = 0
        for number, ins in enumerate(tp.instructions):
            if ins.connection_mode != "uvu" or not ins.has_weight:
                raise ValueError(f"NeighbourTensorProduct takes weighted 'uvu' paths only, got {ins}")
            mul = tp.irreps_in1[ins.i_in1].mul
            l1, l2, l3 = (tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l)
            # e3nn's output is path_weight * sum_ab C_abk x_a y_b * w: fold the path weight into C (in
            # float64, as the symmetric contraction's coefficients: exact when the model is made .double())
            name = f"coupling_{number}"
            coupling = ins.path_weight * o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
            self.register_buffer(name, coupling, persistent=False)
            by_harmonic.setdefault(ins.i_in2, []).append((ins.i_in1, slice(start, start + mul), ins.i_out, name))
            start += mul
        self.groups: list[tuple[int, list[tuple[int, slice, int, str]]]] = sorted(by_harmonic.items())

    def forward(
        self, x: torch.Tensor, edge_sh: torch.Tensor, weights: torch.Tensor, edge_index: torch.Tensor
    ) -> torch.Tensor:
        sources, centres = edge_index
        num_atoms, num_edges = x.shape[0], edge_index.shape[1]
        outputs: list[torch.Tensor | None] = [None] * len(self.irreps_out)
        # no edges: width 0, and the products are zeros that still depend on the inputs (forces are 0)
        slots, width = padded_slots(centres, num_atoms)
        x_sources = x.index_select(0, sources)
        in_slices, sh_slices = self.irreps_in1.slices(), self.irreps_in2.slices()
        harmonics = _pad(edge_sh, slots, num_atoms, width)
        for i_sh, paths in self.groups:
            weighted = []  # (num_edges, mul * dim_in) per path, all multiplied by the same Y_l2 below
            for i_in, w_slice, _, _ in paths:
                mul, ir_in = self.irreps_in1[i_in]
                block = x_sources[:, in_slices[i_in]].view(num_edges, mul, ir_in.dim)
                weighted.append((block * weights[:, w_slice].unsqueeze(-1)).reshape(num_edges, mul * ir_in.dim))
            stacked = _pad(torch.cat(weighted, dim=1), slots, num_atoms, width)
            sums = torch.bmm(stacked.transpose(1, 2), harmonics[:, :, sh_slices[i_sh]])  # (atoms, F, dim_sh)
            offset = 0
            for i_in, _, i_out, name in paths:
                mul, ir_in = self.irreps_in1[i_in]
                part = sums[:, offset : offset + mul * ir_in.dim].view(num_atoms, mul, ir_in.dim, -1)
                offset += mul * ir_in.dim
                out = torch.einsum("nuab,abk->nuk", part, getattr(self, name).to(part.dtype)).reshape(num_atoms, -1)
                outputs[i_out] = out if outputs[i_out] is None else outputs[i_out] + out
        blocks = [
            out if out is not None else x.new_zeros((num_atoms, mul * ir.dim))
            for out, (mul, ir) in zip(outputs, self.irreps_out, strict=True)
        ]
        return torch.cat(blocks, dim=1)
