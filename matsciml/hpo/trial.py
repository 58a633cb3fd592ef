"""One trial of a search: a ``matsciml fit`` run in this process, its score and its pruning.

Trials run in-process through :func:`matsciml.cli.training.run` so that the pruning callback
holds the live Optuna trial. Each trial's run folder is ``<study-dir>/trials/trial_NNNN/`` with
the usual step record, which is also where the score is read from: one source of truth for
what a trial measured.
"""

from __future__ import annotations

import json
import math
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from matsciml.cli.errors import one_line
from matsciml.hpo import HPOError
from matsciml.records.provenance import load_record, write_atomically


class TrialFailed(Exception):
    """The trial's ``fit`` raised or measured a non-finite score; the study goes on without it."""


class PruningCallback(pl.Callback):
    """Reports ``metric`` to ``trial`` after each validation epoch; stops training when it should be pruned.

    Stopping goes through ``trainer.should_stop``, so the run ends cleanly (checkpoints and step
    record written) after the current epoch; :attr:`pruned_epoch` tells the caller it happened.
    Runs on one process: under DDP the other ranks would not see the decision.

    Args:
        trial: an Optuna trial (anything with ``report`` and ``should_prune``).
        metric: the logged metric to report, e.g. ``val/energy_mae``.
    """

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_epoch: int | None = None

    # on_validation_end, like Lightning's EarlyStopping: the epoch's metrics are reduced by then
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return  # a missing metric is reported from the step record, with the names that exist
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_epoch = trainer.current_epoch
            trainer.should_stop = True


def trial_dir(study_dir: Path, name: str | int) -> Path:
    """``<study-dir>/trials/trial_NNNN``: zero-padded so listings sort in trial order."""
    return Path(study_dir) / "trials" / (f"trial_{name:04d}" if isinstance(name, int) else f"trial_{name}")


def run_fit(base_config: Path, overrides: list[str], run_dir: Path, callbacks: list[pl.Callback]) -> dict[str, Any]:
    """``matsciml fit --config base_config *overrides`` logging to ``run_dir``; returns its step record.

    Raises:
        HPOError: ``fit`` rejected the arguments (a wrong key in the space file fails every trial alike).
        Exception: whatever the run raised; its step record says FAILED.
    """
    from matsciml.cli.training import run

    run_dir = Path(run_dir)
    argv = [
        "fit",
        "--config",
        str(base_config),
        *overrides,
        f"--trainer.logger.init_args.save_dir={run_dir.parent.parent}",
        f"--trainer.logger.init_args.name={run_dir.parent.name}",
        f"--trainer.logger.init_args.version={run_dir.name}",
        # whatever Lightning roots there (SLURM's hpc checkpoints, profiles) stays in the trial's folder
        f"--trainer.default_root_dir={run_dir}",
    ]
    try:
        run(argv, extra_callbacks=callbacks)
    except ArgumentError as err:  # jsonargparse refused a key or value
        raise HPOError(f"matsciml fit refused the trial's arguments ({one_line(err)}): {' '.join(argv)}") from None
    return load_record(run_dir)


def score(record: dict[str, Any], metric: str, where: Path) -> float:
    """The trial's score: the best validation value of ``metric`` in its record, else the last one.

    Raises:
        HPOError: the run never logged ``metric`` (a typo in the space file: every trial would fail).
        TrialFailed: the metric is not finite (the run diverged).
    """
    metrics = record["metrics"]
    best = metrics["best"].get(metric)
    if isinstance(best, dict) and best.get("value") is not None:
        return float(best["value"])
    if metric not in metrics["final"]:
        logged = ", ".join(sorted(metrics["final"])) or "none"
        raise HPOError(f"{where}: the run logged no metric {metric!r} (the space file's metric); logged: {logged}")
    value = metrics["final"][metric]
    if value is None or not math.isfinite(value):
        raise TrialFailed(f"{metric} is not finite in {where}")
    return float(value)


def link(run_dir: Path, system: str, facts: dict[str, Any]) -> None:
    """Add ``{system: facts}`` to the ``links`` of the step record in ``run_dir`` (if it has one)."""
    path = Path(run_dir) / "step.json"
    if not path.is_file():  # fit failed before its record was opened
        return
    record = load_record(path)
    record["links"][system] = facts
    write_atomically(path, json.dumps(record, indent=1, default=str) + "\n")
