"""``EpochTimer``: wall time of every training and validation epoch, logged and kept in memory.

Use it from the CLI with ``--trainer.callbacks+=matsciml.tasks.timing.EpochTimer``; the CSV logger's
``metrics.csv`` then has a ``time/train_epoch_s`` column (one value per epoch, in the row of the
training epoch metrics) and ``time/val_epoch_s`` (in the validation rows).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl


class EpochTimer(pl.Callback):
    """Log ``time/train_epoch_s`` and ``time/val_epoch_s`` (seconds, ``time.perf_counter``).

    The training time runs from ``on_train_epoch_start`` to ``on_train_epoch_end`` minus the
    validation loops that Lightning runs inside the training epoch, so the two figures do not
    overlap. Sanity-check validation is not timed. Every rank measures its own epochs
    (``epoch_times`` and ``val_times`` hold this process's); the logged value is the slowest
    rank's (``reduce_fx="max"``), which is the epoch's wall time, since ranks wait for each other
    at every gradient all-reduce. Syncing also avoids Lightning's warning about unsynced epoch
    metrics under DDP.

    Attributes:
        epoch_times: training seconds of each finished epoch, in order.
        val_times: seconds of each validation loop, in order.
    """

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self.val_times: list[float] = []
        self._train_start: float | None = None
        self._val_start: float | None = None
        self._val_in_epoch = 0.0

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, seconds: float) -> None:
        pl_module.log(name, seconds, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_in_epoch = 0.0
        self._train_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is None:  # resumed at an epoch end: nothing was timed
            return
        seconds = time.perf_counter() - self._train_start - self._val_in_epoch
        self._train_start = None
        self.epoch_times.append(seconds)
        self._log(pl_module, "time/train_epoch_s", seconds)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = None if trainer.sanity_checking else time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is None:
            return
        seconds = time.perf_counter() - self._val_start
        self._val_start = None
        self.val_times.append(seconds)
        if self._train_start is not None:  # inside a training epoch: not training time
            self._val_in_epoch += seconds
        self._log(pl_module, "time/val_epoch_s", seconds)
