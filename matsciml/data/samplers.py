"""Samplers for multi-process (DDP) training and evaluation.

Two problems with the stock ``torch.utils.data.DistributedSampler`` that Lightning injects by default:

* it **pads** the index list so that every rank gets the same number of samples, which repeats
  up to ``world_size - 1`` structures in every validation/test epoch and skews the reduced metrics;
* it splits structures, not work: with batches of a fixed number of structures, the rank that draws
  the large slabs runs longest and every other rank waits for it at the gradient all-reduce.

:class:`UnpaddedDistributedSampler` evaluates every structure exactly once over all ranks (shares may
differ by one structure; Lightning reduces ``sync_dist`` metrics once per epoch, so uneven batch counts
are fine for validation and test). :class:`AtomBalancedBatchSampler` forms training batches so every
rank gets about the same number of atoms per step and exactly the same number of steps.

Both subclass ``DistributedSampler``. Lightning replaces a loader's sampler only when
``not isinstance(dataloader.sampler, DistributedSampler)``
(``lightning/pytorch/trainer/connectors/data_connector.py``, ``_requires_distributed_sampler``), so loaders
built with them (and :class:`BatchSamplerLoader`, whose ``sampler`` attribute is its batch sampler) are
left alone whatever the Trainer's ``use_distributed_sampler`` flag says.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = [
    "AtomBalancedBatchSampler",
    "BatchSamplerLoader",
    "DistributedBatchLoader",
    "UnpaddedDistributedSampler",
    "distributed_context",
]


def distributed_context(trainer: Any = None) -> tuple[int, int] | None:
    """``(world_size, rank)`` when running with more than one process, else ``None``.

    Uses the Trainer's ``distributed_sampler_kwargs`` (set by its strategy once processes are launched),
    falling back to an initialised ``torch.distributed`` process group.
    """
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    if kwargs:
        world, rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    else:
        return None
    return (world, rank) if world > 1 else None


def _check_rank(num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, r + 2w, ...`` (of a seeded permutation if ``shuffle``).

    Every index appears exactly once over all ranks; nothing is padded or dropped, so shares differ by at
    most one. For evaluation: ``len(dataset) >= num_replicas`` is required so that every rank logs metrics
    (a rank without batches would leave the others waiting at the metric reduction).

    With one replica and ``shuffle=True`` it is the single-process training order: epoch ``e`` is the
    permutation seeded by ``(seed, e)`` whoever iterates it, so a resumed run repeats no earlier epoch.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool = False, seed: int = 0):
        _check_rank(num_replicas, rank)
        if len(dataset) < num_replicas:
            raise ValueError(
                f"{len(dataset)} structures cannot be shared by {num_replicas} processes: "
                "every process needs at least one"
            )
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.total_size)
        else:
            order = np.arange(self.total_size)
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class AtomBalancedBatchSampler(DistributedSampler):
    """Distributed training batches with about the same number of atoms on every rank at every step.

    Each epoch, a permutation seeded by ``(seed, epoch)`` (identical on all ranks) is cut into steps of
    ``num_replicas * batch_size`` structures. Within a step the structures are split into ``num_replicas``
    batches of at most ``batch_size`` by greedy longest-first assignment to the least-loaded batch; rank
    ``r`` takes batch ``r``. Every rank thus has the same number of steps (no rank waits forever at the
    all-reduce), and per-step atom counts differ by about one structure's size. The last step may be
    smaller; if it has fewer structures than ranks, it is topped up from the start of the permutation
    (a few training structures seen twice), or dropped with ``drop_last=True``.

    Without atom counts (``natoms=None``, e.g. legacy OC20 files without metadata) the same scheme runs
    with equal-size splits: plain shuffled batches.

    ``draw``: an object whose ``epoch_order(seed, epoch, shuffle)`` gives the epoch's ``len(dataset)``
    indices in place of the permutation (the weighted draw of a
    :class:`~matsciml.data.mixture.MixtureDataset`); steps, balance and resume are the same.

    Set ``set_epoch(epoch)`` every epoch (Lightning does) for a new order. To resume mid-epoch, set
    ``start_batch`` (or ``load_state_dict(state_dict())``): the next iteration of that epoch skips the
    batches already done; :class:`BatchSamplerLoader` tracks this for Lightning's checkpoints.

    It yields lists of indices: pass it as ``batch_sampler`` (through :class:`BatchSamplerLoader`).
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int,
        rank: int,
        natoms: np.ndarray | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        draw: Any = None,
    ):
        _check_rank(num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) < num_replicas:
            raise ValueError(f"{len(dataset)} structures cannot be shared by {num_replicas} processes")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.size = len(dataset)
        if natoms is not None:
            natoms = np.asarray(natoms, dtype=np.int64)
            if natoms.shape != (self.size,):
                raise ValueError(f"natoms has shape {natoms.shape}, expected ({self.size},)")
        self.natoms = natoms
        self.draw = draw
        self.batch_size = batch_size
        self.start_batch = 0
        self._start_epoch: int | None = None  # epoch that start_batch applies to (None: the current one)

    # -- the plan of one epoch ------------------------------------------------------------------
    def _order(self) -> np.ndarray:
        if self.draw is not None:
            order = np.asarray(self.draw.epoch_order(self.seed, self.epoch, self.shuffle), dtype=np.int64)
            if order.shape != (self.size,):
                raise ValueError(f"the epoch draw has shape {order.shape}, expected ({self.size},)")
        elif self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        step = self.num_replicas * self.batch_size
        rest = len(order) % step
        if self.drop_last and len(order) >= step:
            return order[: len(order) - rest]
        if 0 < rest < self.num_replicas:  # every rank needs a batch in the last step
            order = np.concatenate([order, order[: self.num_replicas - rest]])
        return order

    def _split(self, chunk: np.ndarray) -> list[list[int]]:
        """``chunk`` into ``num_replicas`` batches of at most ``ceil(len / num_replicas)``, balanced by atoms."""
        if self.natoms is None:
            return [part.tolist() for part in np.array_split(chunk, self.num_replicas)]
        capacity = math.ceil(len(chunk) / self.num_replicas)
        loads = np.zeros(self.num_replicas, dtype=np.int64)
        counts = np.zeros(self.num_replicas, dtype=np.int64)
        full = np.iinfo(np.int64).max
        batches: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for index in chunk[np.argsort(-self.natoms[chunk], kind="stable")].tolist():
            target = int(np.argmin(np.where(counts < capacity, loads, full)))
            batches[target].append(index)
            loads[target] += self.natoms[index]
            counts[target] += 1
        return batches

    def epoch_batches(self, rank: int | None = None) -> list[list[int]]:
        """All batches of ``rank`` (default: this rank) in the current epoch."""
        rank = self.rank if rank is None else rank
        order = self._order()
        step = self.num_replicas * self.batch_size
        return [self._split(order[start : start + step])[rank] for start in range(0, len(order), step)]

    # -- iteration, length, epochs, resume ------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        start = self.start_batch if self._start_epoch in (None, self.epoch) else 0
        self.start_batch, self._start_epoch = 0, None  # a resume offset applies once
        return iter(self.epoch_batches()[start:])

    def __len__(self) -> int:
        step = self.num_replicas * self.batch_size
        return self.size // step if self.drop_last and self.size >= step else math.ceil(self.size / step)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume epoch ``state["epoch"]`` at batch ``state["start_batch"]`` on the next iteration."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["start_batch"])
        self._start_epoch = self.epoch


class DistributedBatchLoader(DataLoader):
    """A DataLoader whose ``sampler`` attribute is its batch sampler when that is a ``DistributedSampler``.

    That tells Lightning the loader is already distributed, so it neither injects its padding
    ``DistributedSampler`` nor tries to rebuild the batch sampler; ``set_epoch`` reaches the batch sampler.
    """

    @property
    def sampler(self):  # type: ignore[override]
        batch_sampler = self.__dict__.get("batch_sampler")
        return batch_sampler if isinstance(batch_sampler, DistributedSampler) else self.__dict__.get("_sampler")

    @sampler.setter
    def sampler(self, value) -> None:  # DataLoader.__init__ assigns a SequentialSampler; keep it aside
        self.__dict__["_sampler"] = value


class BatchSamplerLoader(DistributedBatchLoader):
    """A DataLoader over an :class:`AtomBalancedBatchSampler`, resumable mid-epoch under Lightning.

    Lightning leaves it as it is (:class:`DistributedBatchLoader`). ``state_dict()`` records the
    batches consumed in the current epoch (Lightning stores it in checkpoints taken mid-epoch);
    ``load_state_dict()`` makes the next iteration of that epoch start after them.
    """

    def __init__(self, dataset, batch_sampler: AtomBalancedBatchSampler, **kwargs):
        self._consumed = 0
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    def __iter__(self):
        self._consumed = (
            self.batch_sampler.start_batch if self.batch_sampler._start_epoch in (None, self.batch_sampler.epoch) else 0
        )
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {**self.batch_sampler.state_dict(), "start_batch": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
