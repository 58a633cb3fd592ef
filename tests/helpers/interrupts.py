"""Callbacks that interrupt a CLI run at a chosen training step (pass them with --trainer.callbacks+=)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    """Sends this process ``signal`` after training step ``step``, once per ``marker`` file.

    SIGUSR1 plays SLURM's warning before preemption (``#SBATCH --signal=SIGUSR1@90``; the marker
    lets the requeued job, the same command line, run to the end); SIGINT plays Ctrl-C.

    After SIGINT the callback waits for the ``KeyboardInterrupt``: Python runs signal handlers at
    some later bytecode, and on a loaded machine training could otherwise finish before that.
    """

    def __init__(self, step: int, marker: str, signal: str = "SIGUSR1"):
        self.step, self.marker, self.signal = step, Path(marker), signal

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), getattr(signal, self.signal))
            if self.signal == "SIGINT":
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    time.sleep(0.01)  # the KeyboardInterrupt is raised here
                raise RuntimeError("SIGINT was sent but no KeyboardInterrupt arrived")


class RaiseAtStep(pl.Callback):
    """Raises ``RuntimeError(message)`` after training step ``step``: a run that fails midway."""

    def __init__(self, step: int, message: str = "deliberate failure"):
        self.step, self.message = step, message

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(self.message)


class KillAtStep(pl.Callback):
    """SIGKILLs this process after training step ``step``, once per ``marker`` file: no handler, no cleanup.

    The marker is written first, so the resumed run (the same command line) trains on. ``rank``:
    only that global rank dies (under DDP the others find out from the collectives or the launcher).
    """

    def __init__(self, step: int, marker: str, rank: int = 0):
        self.step, self.marker, self.rank = step, Path(marker), rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.write_text(f"{self.step} {os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)


class NonFiniteAtStep(pl.Callback):
    """Turns the positions of the training batches at the given steps into NaN: a step that diverges.

    Args:
        steps: the ``trainer.global_step`` values whose batch is poisoned (an int or a list).
        value: what the positions become (``"nan"`` or ``"inf"``).
        rank: poison only this global rank's batch (default: every rank's).
    """

    def __init__(self, steps: int | list[int], value: str = "nan", rank: int | None = None):
        self.steps = {steps} if isinstance(steps, int) else set(steps)
        self.value, self.rank = float(value), rank

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, *args) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            batch["positions"].fill_(self.value)  # in place: the batch the training step gets
