"""geometric-algebra-attention 0.5 adapted for forces and padded batches (used by Gala).

Two changes to the package's layers, both explained in :mod:`matsciml.models.gala`:

* smooth norms ``sqrt(|x|^2 + eps^2)`` in the invariants, so forces are continuous where two
  bonds are parallel and the double backward of a force loss stays finite;
* momentum normalisations whose running statistics come from real (unpadded) entries only and
  are updated after use, so no output depends on the rest of its batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from geometric_algebra_attention.pytorch import (
    MomentumLayerNormalization,
    MomentumNormalization,
    Vector2VectorAttention,
    VectorAttention,
    geometric_algebra,
)

#: Offset of the smooth norm, in the units of the normed quantity (Å, Å^2).
NORM_EPSILON = 1e-2


# -- the package's geometric algebra with smooth norms -------------------------------------
def smooth_norm(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(|x|^2 + eps^2)`` over the last axis, kept: smooth at ``x = 0`` to all orders."""
    return torch.sqrt((x * x).sum(dim=-1, keepdim=True) + NORM_EPSILON**2)


class _SmoothAlgebra:
    """``geometric_algebra_attention.pytorch.geometric_algebra`` with :func:`smooth_norm`.

    The products are the package's; only the functions that take norms are replaced.
    """

    custom_norm = staticmethod(smooth_norm)

    @staticmethod
    def vecvec_invariants(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[..., :1], smooth_norm(p[..., 1:4])], dim=-1)

    @staticmethod
    def bivecvec_invariants(q: torch.Tensor) -> torch.Tensor:
        return torch.cat([smooth_norm(q[..., :3]), q[..., 3:4]], dim=-1)

    trivecvec_invariants = vecvec_invariants

    def __getattr__(self, name: str):
        return getattr(geometric_algebra, name)


SMOOTH_ALGEBRA = _SmoothAlgebra()


class InvariantAttention(VectorAttention):
    """The package's ``VectorAttention`` with smooth norms."""

    algebra = SMOOTH_ALGEBRA

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init()  # the package creates its kernels only for its own class, not subclasses


class EquivariantAttention(Vector2VectorAttention):
    """The package's ``Vector2VectorAttention`` with smooth norms."""

    algebra = SMOOTH_ALGEBRA

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init()


# -- normalisation over real tuples only ---------------------------------------------------
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x (..., D)`` over the entries where ``mask (...)`` is True, and whether any is."""
    weights = mask.broadcast_to(x.shape[:-1]).unsqueeze(-1).to(x.dtype)
    count = weights.sum()
    return (x * weights).sum(dim=tuple(range(x.ndim - 1))) / count.clamp(min=1), count > 0


def _update(running: torch.Tensor, momentum: torch.Tensor, value: torch.Tensor, any_real: torch.Tensor) -> None:
    """``running <- momentum * running + (1 - momentum) * value`` when the batch had real entries."""
    running.copy_(torch.where(any_real, momentum * running + (1 - momentum) * value, running))


class MaskedMomentumNormalization(MomentumNormalization):
    """The package's ``MomentumNormalization`` with statistics of real entries only.

    ``(x - mu) / sigma`` per feature with running ``mu``, ``sigma``. In training, the batch
    is normalised with the statistics from before it, then its masked mean and standard
    deviation enter the running averages, so no output depends on the rest of its batch.
    Inside a package attention layer (which calls it with one argument) the mask is given
    with :meth:`masked`.
    """

    def __init__(self, n_dim: int, momentum: float = 0.99):
        super().__init__(n_dim, momentum)
        self.mask: torch.Tensor | None = None

    @contextmanager
    def masked(self, mask: torch.Tensor) -> Iterator[None]:
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shift = self.mu.clone()
        scale = 1.0 / torch.clamp(self.sigma, min=1e-7)
        if self.training:
            mask = self.mask if mask is None else mask
            if mask is None:
                raise RuntimeError("MaskedMomentumNormalization needs the mask of real entries in training")
            with torch.no_grad():
                mean, any_real = _masked_mean(x, mask)
                variance, _ = _masked_mean((x - mean) ** 2, mask)
                _update(self.mu, self.momentum, mean, any_real)
                _update(self.sigma, self.momentum, variance.sqrt(), any_real)
        return (x - shift) * scale


class MaskedMomentumLayerNormalization(MomentumLayerNormalization):
    """The package's ``MomentumLayerNormalization`` (vectors divided by a running mean norm).

    The running mean comes from real entries only and, in training, is updated after use,
    as in :class:`MaskedMomentumNormalization`.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = 1.0 / torch.maximum(self.norm, self.epsilon)
        if self.training:
            if mask is None:
                raise RuntimeError("MaskedMomentumLayerNormalization needs the mask of real entries in training")
            with torch.no_grad():
                mean, any_real = _masked_mean(smooth_norm(x), mask)
                _update(self.norm, self.momentum, mean, any_real)
        return x * scale
