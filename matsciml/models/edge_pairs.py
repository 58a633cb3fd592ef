"""Atom pairs of a radius graph: both directions of a pair share their distance and radial weights."""

from __future__ import annotations

import torch


def undirected_pairs(edge_index: torch.Tensor, cell_shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One representative edge per atom pair, and each edge's pair.

    A radius graph holds ``j -> i`` (shift ``S``) and ``i -> j`` (shift ``-S``): their vectors are exact
    negatives, so distances, radial bases and radial-MLP weights are bitwise equal. Computing those per
    pair halves the radial work (the radial MLPs are a third of a NequIP force-training step). Edges
    without their reverse (a neighbour cap) are pairs of their own.

    Returns:
        ``representatives (num_pairs,)``: an edge of each pair; ``pair (num_edges,)``: its pair's index.
    """
    j, i = edge_index
    shifts = cell_shifts.to(torch.int64)
    # orient every edge from the lower to the higher atom index; for i == j (a periodic image of
    # itself), take the shift whose first non-zero component is positive
    first_nonzero = torch.gather(shifts, 1, (shifts != 0).to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    flip = (i > j) | ((i == j) & (first_nonzero < 0))
    low, high = torch.where(flip, j, i), torch.where(flip, i, j)
    shifts = torch.where(flip.unsqueeze(-1), -shifts, shifts)
    base = 2 * int(shifts.abs().max()) + 1 if shifts.numel() else 1
    num_atoms = int(edge_index.max()) + 1 if edge_index.numel() else 1
    key = low * num_atoms + high
    for axis in range(3):
        key = key * base + shifts[:, axis] + base // 2
    unique, pair = torch.unique(key, return_inverse=True)
    representatives = torch.empty(unique.shape[0], dtype=torch.int64, device=key.device)
    representatives.scatter_(0, pair, torch.arange(key.shape[0], device=key.device))
    return representatives, pair
