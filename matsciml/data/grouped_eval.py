"""Validation on several datasets at once: overall metrics, and the same metrics per dataset.

A validation split given as a list (``val_path: [a, b]``) is read through one loader whose batches
never mix datasets (:class:`GroupedBatchSampler`), so each batch belongs to one dataset, named in
the sampler's ``groups``. The task logs every batch's metrics under ``val/<metric>`` exactly as with
one dataset (weighted means over every structure once) and again under ``val/<name>/<metric>``
(:func:`validation_group` tells it the name). One loader, not one per dataset: Lightning logs a
metric of several loaders per loader (``/dataloader_idx_N``) and refuses one key from two of them,
so the overall value would be lost.

With DDP each rank takes structures ``rank, rank + world, ...`` of every dataset, without padding;
every dataset must then have at least one structure per rank, as every rank must log every
metric name, in the same order (the reduction at the end of validation is one collective per name):
every rank gets the same number of batches of each dataset, in the same order (unless
``batch_size=1`` with shares of unequal size makes that impossible without padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler

from matsciml.data.mixture import MixtureDataset

__all__ = ["GroupedBatchSampler", "validation_group"]


class GroupedBatchSampler(DistributedSampler):
    """Evaluation batches of at most ``batch_size`` structures of one dataset each, in dataset order.

    Every structure appears exactly once over all ranks. ``groups[b]`` names the dataset of this
    rank's batch ``b``. Pass it as ``batch_sampler`` (through a
    :class:`~matsciml.data.samplers.DistributedBatchLoader`, so Lightning leaves it alone).

    Args:
        dataset: the validation mixture.
        batch_size: structures per batch.
        num_replicas, rank: DDP world size and this process's rank.

    Raises:
        ValueError: a dataset with fewer structures than ranks.
    """

    def __init__(self, dataset: MixtureDataset, batch_size: int, num_replicas: int = 1, rank: int = 0):
        small = [f"{n} ({s})" for n, s in zip(dataset.names, dataset.sizes, strict=True) if s < num_replicas]
        if small:
            raise ValueError(
                f"validation dataset(s) {', '.join(small)} have fewer structures than the {num_replicas} "
                "processes; every process needs one of each to log its metrics"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.batches: list[list[int]] = []
        self.groups: list[str] = []
        for name, start, stop in zip(dataset.names, dataset.offsets[:-1], dataset.offsets[1:], strict=True):
            share = np.arange(start, stop)[rank::num_replicas]
            # DDP shares differ by one structure; where the smallest allows it every rank cuts its share into
            # the same number of batches, so all ranks log the same names in the same order even when
            # limit_val_batches or the sanity check stops validation partway. One process: batches of
            # batch_size, as the loader of one dataset makes
            count = math.ceil(math.ceil((stop - start) / num_replicas) / batch_size)
            if num_replicas > 1 and count <= (stop - start) // num_replicas:
                parts = np.array_split(share, count)
            else:
                parts = [share[first : first + batch_size] for first in range(0, len(share), batch_size)]
            self.batches += [part.tolist() for part in parts]
            self.groups += [name] * len(parts)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def validation_group(trainer: Any, batch_idx: int) -> str | None:
    """The dataset name of validation batch ``batch_idx``, when validating on several datasets; else ``None``.

    Looks at the loader of the running validation (``trainer.validate`` or the one inside ``fit``);
    batch ``batch_idx`` of it is the sampler's batch ``batch_idx``, as Lightning counts batches per run.
    """
    if trainer is None:
        return None
    validating = getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.VALIDATING
    loop = trainer.validate_loop if validating else trainer.fit_loop.epoch_loop.val_loop
    combined = getattr(loop, "_combined_loader", None)
    loader = getattr(combined, "iterables", None)
    groups = getattr(getattr(loader, "batch_sampler", None), "groups", None)
    return None if groups is None else groups[batch_idx]
