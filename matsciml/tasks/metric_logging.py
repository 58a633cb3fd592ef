"""How a task logs its metrics: weighted means over all ranks, reduced once per epoch.

Training also logs each step's value (``train/<name>_step``), which stays on its rank: a
collective every step would cost more than the value is worth. The epoch value
(``train/<name>_epoch``) is accumulated in a :class:`~matsciml.tasks.weighted_mean.WeightedMean`,
which Lightning computes at the epoch's end, reduced over all ranks then, once. Validation and test
values are logged with their weight as ``batch_size`` and ``sync_dist``.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch

from matsciml.tasks.weighted_mean import WeightedMean


def log_weighted(module: pl.LightningModule, stage: str, metrics: Mapping[str, tuple[torch.Tensor, int]]) -> None:
    """Log ``name: (value, weight)`` as ``<stage>/<name>`` (stage ``train``, ``val``, ``val/<dataset>``, ``test``).

    Args:
        module: the task (its ``log``; the training means live in its ``_train_means``).
    """
    for name, (value, weight) in metrics.items():
        if weight == 0:
            continue
        # the progress bar shows the training loss and the validation MAEs, not every metric
        shown = name == "loss" if stage == "train" else name in ("energy_mae", "force_mae")
        key = f"{stage}/{name}"
        if stage == "train":
            means = getattr(module, "_train_means", None)
            if means is None:  # no parameters, no persistent state: checkpoints do not change
                means = module._train_means = torch.nn.ModuleDict()
            if key not in means:
                means[key] = WeightedMean().to(value.device)
            means[key](value.detach().float(), float(weight))
            module.log(
                key, means[key], on_step=True, on_epoch=True, prog_bar=shown, metric_attribute=f"_train_means.{key}"
            )
            continue
        # a float weight: Lightning keeps an integer count truncated by world size in sync_dist,
        # which inflates weighted means when ranks hold uneven shares (unpadded validation)
        module.log(
            key,
            value.detach().float(),
            batch_size=float(weight),
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            prog_bar=shown,
        )
