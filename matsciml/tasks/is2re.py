"""IS2RE: initial structure to relaxed (adsorption) energy, an L1 regression by default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from matsciml.data import keys as K
from matsciml.data.backends import as_batch
from matsciml.data.batch import Batch
from matsciml.tasks.base import AtomisticTask


class IS2RETask(AtomisticTask):
    """Predict the relaxed energy from the initial structure (OC20 IS2RE); alias ``IS2RELitModule``.

    Adsorption energies are differences of total energies and do not grow with the cell, so
    the normaliser shifts by the mean target per structure and scales by its std.

    Arguments are those of :class:`AtomisticTask`.
    """

    task = "is2re"
    energy_key = K.RELAXED_ENERGY
    extensive = False

    def normalizer_settings(self, statistics: Mapping[str, Any]) -> tuple[float, float]:
        target = statistics[K.RELAXED_ENERGY]
        scale = float(target["std"])
        return float(target["mean"]), scale if scale > 0 else 1.0

    def step(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        batch = as_batch(batch)
        energy = self.energy(batch)
        target = batch.relaxed_energy.to(energy.dtype)
        scale = self.energy_scale.to(energy.dtype)
        loss = self.loss_fn(energy / scale, target / scale)
        metrics = self.energy_metrics(energy, target, batch)
        return loss, metrics


#: The name used in the Open MatSci ML Toolkit paper.
IS2RELitModule = IS2RETask
