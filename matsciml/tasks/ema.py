"""An exponential moving average of a task's weights, for validation, checkpoints and export.

Built on Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`: after every
optimiser step ``ema = d * ema + (1 - d) * weights`` (the first step copies), with a warm-up
``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates. Without it a fraction ``decay^n`` of
the random initial weights stays in the average (79 % after 230 steps at 0.999), so the best
checkpoint of a short run was barely trained; with it the average follows the early,
fast-moving weights and reaches the full ``decay`` after about 9000 steps at 0.999. Validation
runs on the average (the weights are swapped in and back), every checkpoint's ``state_dict`` holds
the average (the raw weights go to ``current_model_state``, so resuming continues both), and the
task ends training holding the average. So the calculator and ``matsciml export``, which read
``state_dict``, use the averaged weights.

Buffers are never averaged: the normaliser's shift, scale, references and flags (``fitted``,
``per_atom``) are the task's constants, and Lightning builds the averaged copy in the callbacks'
``setup``, before the task's ``setup`` fits the normaliser. They are copied from the live task
before every swap and save instead.
For the same reason the parameters are copied from the task again when the fit starts, if the average
has had no update yet: a fine-tune's parent (``init_from``) is loaded after ``setup``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMA


class EMAWeightAveraging(_LightningEMA):
    """Keep an exponential moving average of the parameters (``AtomisticTask(ema_decay=...)`` adds it).

    Args:
        decay: weight of the running average at each optimiser step, in ``[0, 1)``; 0.999 averages
            over roughly the last 1000 steps.
        device: where the averaged copy lives (default: with the task).
    """

    def __init__(self, decay: float = 0.999, device: str | None = None):
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be a number in [0, 1), got {decay!r}")
        super().__init__(device=device, use_buffers=False, decay=float(decay))
        self.decay = float(decay)
        self._kwargs["avg_fn"] = warmed_up_ema(self.decay)  # replaces Lightning's fixed-decay average

    def _copy_buffers(self, pl_module: pl.LightningModule) -> None:
        """The averaged copy takes the task's buffers (constants: never averaged)."""
        if self._average_model is None:
            return
        current = dict(pl_module.named_buffers())  # by name: the live task may have gained modules since the copy
        with torch.no_grad():
            for name, average in self._average_model.module.named_buffers():
                if name in current:
                    average.copy_(current[name])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the copy was taken in setup, before the optimiser's configuration loaded init_from's parent;
        # until its first update (a resumed average has had some) the average is the task's weights
        if self._average_model is not None and int(self._average_model.n_averaged) == 0:
            with torch.no_grad():
                for average, live in zip(self._average_model.module.parameters(), pl_module.parameters(), strict=True):
                    average.copy_(live)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._copy_buffers(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._copy_buffers(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._copy_buffers(pl_module)
        super().on_train_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._average_model is None:
            return  # validate/test/predict: the checkpoint's state_dict already holds the average
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


def warmed_up_ema(decay: float):
    """``AveragedModel``'s averaging function: ``d * ema + (1 - d) * current``, ``d = min(decay, (1 + n) / (10 + n))``.

    ``n`` is the number of updates so far (``AveragedModel.n_averaged``: 1 at the first average
    after the copy); it stays a tensor, so a GPU run does not wait for it every step.
    """

    def average(ema: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int) -> torch.Tensor:
        n = torch.as_tensor(num_averaged, dtype=ema.dtype, device=ema.device)
        step_decay = torch.clamp((1.0 + n) / (10.0 + n), max=decay)
        return ema + (current - ema) * (1.0 - step_decay)

    return average
