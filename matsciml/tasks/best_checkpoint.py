"""``checkpoints/best.ckpt``: the checkpoint of the validation with the lowest monitored metric.

A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose metric is the task's ``monitor``
(``val/force_mae`` for S2EF with forces, ``val/energy_mae`` otherwise, or the task's choice), read
from the task when training starts, so one trainer default fits every task.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

#: the ``monitor`` placeholder replaced by the task's metric in ``setup``
TASK_MONITOR = "task"


class BestCheckpoint(ModelCheckpoint):
    """Keep one checkpoint, ``best.ckpt``, of the best validation by ``monitor`` (lower is better).

    Args:
        monitor: a logged validation metric, or ``"task"`` (default): the task's ``monitor``.
        dirpath: the folder (default: Lightning's, ``<run>/checkpoints``).
    """

    def __init__(self, monitor: str = TASK_MONITOR, dirpath: str | None = None):
        # saved after validations only: a run without validation has no best, and says nothing
        super().__init__(
            dirpath=dirpath, filename="best", monitor=monitor, mode="min", save_top_k=1, save_on_train_epoch_end=False
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.monitor == TASK_MONITOR:
            monitor = getattr(pl_module, "monitor", None)
            if not isinstance(monitor, str):
                raise ValueError(
                    f"BestCheckpoint(monitor='task') needs a task with a 'monitor' metric; "
                    f"{type(pl_module).__name__} has none: pass BestCheckpoint(monitor='val/...')"
                )
            self.monitor = monitor
        super().setup(trainer, pl_module, stage)
