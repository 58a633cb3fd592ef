"""Parity plots and the learning curve of a run, drawn when it ends (:mod:`matsciml.records.plots` draws).

Our ``validation_step``/``test_step`` return nothing, so the callback predicts each batch again
in ``on_{validation,test}_batch_end`` with ``pl_module(batch)``: one more energy-and-force pass,
during the final validation epoch of ``fit`` and during ``validate``/``test`` only. That keeps the
tasks untouched at the price of one extra evaluation pass per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info

from matsciml.data.backends import as_batch
from matsciml.records import plots


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


class _Share:
    """One rank's predictions for a parity plot: every energy and every free force component."""

    def __init__(self) -> None:
        self.energy: list[tuple[np.ndarray, np.ndarray]] = []
        self.forces: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str) -> None:
        batch = as_batch(batch)
        # the precision context of the step (autocast under bf16-mixed), so predictions match the logged ones
        precision = trainer.precision_plugin
        with precision.val_step_context() if split == "val" else precision.test_step_context():
            out = pl_module(batch)
        self.energy.append((_numpy(out["energy"]), _numpy(batch[pl_module.energy_key])))
        if "forces" in out and batch.forces is not None:
            # fixed atoms are left out, as in the force metrics
            free = ~batch.fixed if batch.fixed is not None else torch.ones_like(batch.atomic_numbers, dtype=torch.bool)
            self.forces.append((_numpy(out["forces"][free]), _numpy(batch.forces[free])))

    def summary(self, limit: int, seed: int) -> dict[str, Any]:
        """Error sums over all points and a sample of at most ``limit`` points per quantity."""
        summary: dict[str, Any] = {}
        for name, pairs in (("energy", self.energy), ("force", self.forces)):
            if not pairs:
                continue
            predicted = np.concatenate([p.reshape(-1) for p, _ in pairs])
            reference = np.concatenate([r.reshape(-1) for _, r in pairs])
            keep = plots.subsample(predicted.size, limit, seed)
            summary[name] = {
                "error": float(np.abs(predicted - reference).sum()),
                "count": predicted.size,
                "points": (predicted[keep], reference[keep]),
            }
        return summary


def _merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in ("energy", "force"):
        parts = [s[name] for s in summaries if name in s]
        if parts:
            count = sum(p["count"] for p in parts)
            merged[name] = {
                "mae": sum(p["error"] for p in parts) / max(count, 1),
                "count": count,
                "points": tuple(np.concatenate([p["points"][i] for p in parts]) for i in (0, 1)),
            }
    return merged


class PlotCallback(pl.Callback):
    """Write ``parity_val.png`` (end of ``fit``, ``validate``), ``parity_test.png`` (``test``) and
    ``learning_curve.png`` (``fit``, from the CSV logger's ``metrics.csv``) to the run directory.

    The parity MAEs are over every rank's structures (error sums are gathered), as the logged
    ``val/energy_mae``, ``val/force_mae``; each rank contributes a seeded sample of at most
    ``max_points / world_size`` points to the scatter. Rank 0 draws and writes. The MAEs shown
    are kept in :attr:`shown` and in each PNG's text metadata (:func:`matsciml.records.plots.read_numbers`).

    The final validation epoch of ``fit`` is the one at ``max_epochs - 1``, at ``max_steps``, or
    after an earlier callback set ``trainer.should_stop``; a run stopped by a callback that runs after
    this one (e.g. early stopping, which decides at the epoch's end) gets no ``parity_val.png``.

    Args:
        max_points: the most points drawn per parity panel (the MAE is over all of them).
        seed: seed of the point sample.
    """

    def __init__(self, max_points: int = plots.MAX_POINTS, seed: int = 0):
        self.max_points, self.seed = max_points, seed
        self.shares: dict[str, _Share] = {}
        self.shown: dict[str, dict[str, float]] = {}  # file stem -> numbers in its legend
        self.directory: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.directory = Path(trainer.log_dir or trainer.default_root_dir)  # collective under DDP: every rank asks

    # -- collecting ------------------------------------------------------------------------
    @staticmethod
    def _last_validation(trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True  # validate: its one pass
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs - 1
        last_step = 0 < trainer.max_steps <= trainer.global_step
        return last_epoch or last_step or trainer.should_stop

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shares.pop("val", None)
        if self._last_validation(trainer):
            self.shares["val"] = _Share()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shares["test"] = _Share()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if "val" in self.shares:
            self.shares["val"].add(trainer, pl_module, batch, "val")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.shares["test"].add(trainer, pl_module, batch, "test")

    # -- drawing ---------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.shares:
            self._parity(trainer, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parity(trainer, "test")

    def _parity(self, trainer: pl.Trainer, split: str) -> None:
        # every rank gets here (the epoch-end hooks run on all), so the gather is collective
        summary = self.shares.pop(split).summary(max(1, self.max_points // trainer.world_size), self.seed)
        summaries = [summary]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            summaries = [None] * trainer.world_size
            torch.distributed.all_gather_object(summaries, summary)
        if not trainer.is_global_zero:
            return
        merged = _merge(summaries)
        if "energy" not in merged:
            return
        forces = merged["force"]["points"] if "force" in merged else None
        mae = {f"{name}_mae": part["mae"] for name, part in merged.items()}
        label = {"val": "validation", "test": "test"}[split]
        when = f", epoch {trainer.current_epoch}" if trainer.state.fn == "fit" else ""
        counts = f"{merged['energy']['count']} structures"
        figure, shown = plots.parity_figure(
            merged["energy"]["points"], forces, mae=mae, title=f"{label} parity ({counts}{when})", max_points=None
        )
        self._save(figure, f"parity_{split}", shown)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loggers have saved metrics.csv (Trainer._teardown) before on_fit_end, and the step
        # record closes only in teardown, after this
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            metrics_csv = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
            if metrics_csv.is_file():
                figure, final = plots.learning_curve_figure(pd.read_csv(metrics_csv), title="learning curve")
                self._save(figure, "learning_curve", final)
                return
        rank_zero_info("matsciml: no metrics.csv (CSVLogger) in this run; no learning_curve.png")

    def _save(self, figure, stem: str, numbers: dict[str, float]) -> None:
        path = plots.save_png(figure, self.directory / f"{stem}.png", numbers)
        self.shown[stem] = numbers
        rank_zero_info(f"matsciml: wrote {path}")
