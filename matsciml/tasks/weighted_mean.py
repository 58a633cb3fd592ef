"""A weighted running mean as a torchmetrics ``Metric``: reduced over all ranks once, when computed.

Lightning logs a ``Metric`` passed to ``self.log`` by its ``forward`` value on each step (this rank's
batch) and by ``compute()`` at the epoch's end, where torchmetrics first sums the states over every
process. So training metrics cost no collective per step, and the epoch value is the weighted mean
over all ranks. (``torchmetrics.MeanMetric`` drops the weights when NaN checks are disabled.)
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class WeightedMean(Metric):
    """``sum(weight * value) / sum(weight)`` over every update on every rank."""

    full_state_update = False
    total: torch.Tensor
    weight: torch.Tensor

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float) -> None:
        """Add a value (a scalar, NaN kept: a diverged step should show) with its weight."""
        self.total += value.detach().to(self.total.dtype) * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight
