"""Plays SLURM's part in requeue tests: the warning signal before preemption, at a chosen step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    """Sends this process SIGUSR1 (``#SBATCH --signal=SIGUSR1@90``) after training step ``step``.

    Only once per ``marker`` file, so the requeued job (the same command line) runs to the end.
    """

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), signal.SIGUSR1)
