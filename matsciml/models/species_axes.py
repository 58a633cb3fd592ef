"""Tensors indexed by atomic number, declared by the modules that own them.

Per-element parameters (an embedding table of ``num_species + 1`` rows, per-species weights, a
one-hot linear layer) let a trained model grow to more elements without losing what it learned
for the old ones: the old rows are copied and the new rows keep their fresh initialisation
(:mod:`matsciml.tasks.init_from`). Which tensors those are, and along which dimension, is not
guessed from names: the module that creates a tensor declares it with a method

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        return {"embedding.weight": SpeciesAxis(dim=0)}

mapping names in the module's own ``state_dict`` to their species axis. Any ``nn.Module`` may
declare one (a layer such as :class:`~matsciml.models.equivariant_layers.SpeciesLinear`, or a model
for the plain ``nn.Embedding`` it holds); :func:`species_axes` collects them over a module tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SpeciesAxis:
    """Where a tensor holds one slice per species.

    Args:
        dim: the dimension indexed by species (0 for embedding rows, 1 for the input columns of
            an ``nn.Linear`` over a one-hot of the species).
        blocks: how many consecutive species ranges the dimension holds, e.g. 2 for a linear
            layer over ``[one_hot(Z_i), one_hot(Z_j)]``: each block grows on its own.
    """

    dim: int = 0
    blocks: int = 1

    def extend(self, fresh: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """``fresh`` with the parent's species slices copied into its first ones, in every block.

        Shapes:
            ``fresh`` and ``parent`` agree except along ``dim``, where ``fresh`` holds at least as
            many species per block; returns a new tensor of ``fresh``'s shape and dtype.

        Raises:
            ValueError: the shapes differ elsewhere, or ``fresh`` holds fewer species.
        """
        dim = self.dim % max(fresh.dim(), 1)
        others_agree = fresh.dim() == parent.dim() and all(
            a == b for i, (a, b) in enumerate(zip(fresh.shape, parent.shape, strict=True)) if i != dim
        )
        if not others_agree or fresh.shape[dim] % self.blocks or parent.shape[dim] % self.blocks:
            raise ValueError(f"shapes {tuple(parent.shape)} and {tuple(fresh.shape)} differ beyond species axis {dim}")
        new, old = fresh.shape[dim] // self.blocks, parent.shape[dim] // self.blocks
        if old > new:
            raise ValueError(f"it holds {old} species slices along dim {dim} in the parent but only {new} here")
        out = fresh.detach().clone()
        target = out.unflatten(dim, (self.blocks, new)).narrow(dim + 1, 0, old)  # a view into out
        target.copy_(parent.detach().to(out.dtype).unflatten(dim, (self.blocks, old)))
        return out


def species_axes(module: nn.Module) -> dict[str, SpeciesAxis]:
    """Every species-indexed tensor of ``module``'s state dict, by its full name.

    Raises:
        ValueError: a module declares a name its own state dict does not hold (a typo would
            otherwise make a growing model fail with an unexplained shape mismatch).
    """
    axes: dict[str, SpeciesAxis] = {}
    for prefix, owner in module.named_modules():
        declare = getattr(owner, "species_indexed", None)
        if declare is None:
            continue
        declared = declare()
        own = owner.state_dict(keep_vars=True) if declared else {}
        for name, axis in declared.items():
            if name not in own or not isinstance(axis, SpeciesAxis):
                raise ValueError(
                    f"{type(owner).__name__}.species_indexed() declares {name!r}: {axis!r}, but it must map "
                    f"names of its state dict ({sorted(own)[:8]}...) to SpeciesAxis"
                )
            axes[f"{prefix}.{name}" if prefix else name] = axis
    return axes
