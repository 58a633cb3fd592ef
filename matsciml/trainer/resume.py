"""Resuming a run where it stopped: in its own folder, from a checkpoint taken mid-epoch.

``matsciml fit <same args> --ckpt_path <run>/checkpoints/last.ckpt`` continues that run. Lightning
restores the weights, optimiser, LR scheduler, callbacks (EMA) and loop counters from the checkpoint;
the training loader (:class:`~matsciml.data.samplers.BatchSamplerLoader`) is stateful, so an epoch
interrupted mid-way resumes at its next batch; :class:`ResumeState` restores the random
generators. What is left is the run's identity: :func:`pin_run_to_checkpoint` points the logger at the
folder the checkpoint lives in (no new ``version_1``), so ``metrics.csv`` and the step record continue,
as a requeued SLURM job does (:mod:`matsciml.trainer.slurm`).

Mid-epoch checkpoints: ``--checkpoint_every_n_steps N`` also writes ``checkpoints/last.ckpt`` every
``N`` optimiser steps (:func:`step_checkpoint`), so a killed run loses at most ``N`` steps.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_max, dim_zero_min, dim_zero_sum

from matsciml.records.provenance import RECORD_NAME
from matsciml.trainer.loggers import versioned_logger_configs

#: the folder Lightning's ModelCheckpoint keeps a run's checkpoints in, inside the run folder
CHECKPOINT_FOLDER = "checkpoints"


def run_folder_of_checkpoint(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run folder of ``<run>/checkpoints/<name>.ckpt`` when ``<run>`` holds a step record, else ``None``."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):  # Lightning's own names
        return None
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    if path.parent.name != CHECKPOINT_FOLDER or not (run / RECORD_NAME).is_file():
        return None
    return run


def pin_run_to_checkpoint(trainer: Any, ckpt_path: str | os.PathLike | None) -> Path | None:
    """Point the loggers of a parsed trainer config at the run folder ``ckpt_path`` was saved in.

    Only loggers whose ``version`` the user left unset change: the first one takes the folder's
    ``save_dir``, ``name`` and ``version`` (Lightning keeps checkpoints in the first logger's folder),
    the others its ``version``. Returns the run folder, or ``None`` when the checkpoint is not in one.
    """
    run = run_folder_of_checkpoint(ckpt_path)
    loggers = versioned_logger_configs(trainer)
    if run is None or not loggers or loggers[0].init_args.get("version") is not None:
        return None
    first = loggers[0].init_args
    first.save_dir, first.name, first.version = str(run.parent.parent), run.parent.name, run.name
    for logger in loggers[1:]:
        if logger.init_args.get("version") is None:
            logger.init_args.version = run.name
    return run


def step_checkpoint(every_n_steps: int) -> ModelCheckpoint:
    """A ModelCheckpoint that rewrites ``last.ckpt`` (and nothing else) every ``every_n_steps`` steps."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"--checkpoint_every_n_steps must be a positive integer, got {every_n_steps!r}")
    return ModelCheckpoint(
        every_n_train_steps=every_n_steps, save_top_k=0, save_last=True, enable_version_counter=False
    )


def rng_states() -> dict[str, Any]:
    """This process's generator states, in types ``torch.load(weights_only=True)`` reads back."""
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _metric_states(pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """The states of the module's torchmetrics metrics that hold updates (e.g. this epoch's training means).

    torchmetrics keeps metric states out of ``state_dict`` (they are not persistent), so a checkpoint
    taken mid-epoch would lose what the epoch has accumulated so far.
    """
    return {
        name: {key: _detached(value) for key, value in module.metric_state.items()}
        for name, module in pl_module.named_modules()
        if isinstance(module, Metric) and module._update_count > 0
    }


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return [_detached(v) for v in value]  # list states ("cat" reduction)


def _fold_metric_states(pl_module: pl.LightningModule, saved: dict[str, dict[str, Any]]) -> None:
    """Add the states saved before the interruption to the metrics the first resumed batch updated.

    Those hold that one batch (``0 + x``, exact); the uninterrupted run computed ``saved + x``, and
    addition commutes, so sums come out the same to the bit (lists concatenate, min/max reduce).
    """
    modules = dict(pl_module.named_modules())
    for name, states in saved.items():
        metric = modules.get(name)
        if not isinstance(metric, Metric) or metric._update_count != 1:
            continue
        for key, value in states.items():
            current, reduction = getattr(metric, key), metric._reductions.get(key)
            if isinstance(current, list):
                setattr(metric, key, [v.to(c.device) for v, c in zip(value, current, strict=False)] + current)
            elif reduction in (dim_zero_max, dim_zero_min):
                pick = torch.maximum if reduction is dim_zero_max else torch.minimum
                setattr(metric, key, pick(value.to(current.device), current))
            elif reduction is dim_zero_sum:
                setattr(metric, key, value.to(current.device) + current)
        metric._computed = None


class ResumeState(pl.Callback):
    """Puts what Lightning leaves out of a checkpoint in it, per rank, so a resumed run goes on exactly.

    * the random generators (torch, CUDA, numpy, random): dropout, random augmentations or anything
      else drawing random numbers after a resume would otherwise draw other numbers;
    * the running sums of the interrupted epoch's ``on_epoch`` training metrics: the resumed epoch's
      ``train/*_epoch`` values would otherwise average only the batches after the resume.

    Every rank keeps its own (ranks draw and sum differently under DDP); a run resumed with another
    number of processes restores neither. Every rank must save the checkpoint (Lightning's rule
    already): the states are gathered from all ranks when it is taken.
    """

    def __init__(self) -> None:
        self._done: tuple[int, int] = (0, 0)  # (epoch, training batches done in it) as of the last batch
        self._to_restore: list[dict[str, Any]] = []  # per rank, from the checkpoint resumed
        self._saved: dict[str, Any] | None = None  # this rank's, until the first resumed batch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._saved is not None:  # the first batch after a resume
            if self._saved["done"] == [trainer.current_epoch, batch_idx]:
                _fold_metric_states(pl_module, self._saved["metrics"])
            self._saved = None
        self._done = (trainer.current_epoch, batch_idx + 1)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = {"rng": rng_states(), "done": list(self._done), "metrics": _metric_states(pl_module)}
        gathered: list[Any] = [states]
        # every rank dumps the checkpoint (rank 0 writes it), so every rank takes part in the gather
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
        checkpoint["callbacks"][self.state_key] = {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = list(state_dict.get("ranks") or [])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's restore and after the resumed epoch's loader iterator drew its base seed,
        # as the uninterrupted run had at the checkpoint
        ranks = self._to_restore
        if len(ranks) == trainer.world_size:
            self._saved = ranks[trainer.global_rank]
            set_rng_states(self._saved["rng"])
        self._to_restore = []
