"""The default CSV logger, made resumable: a run continued in its own folder keeps its history.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already exists, which loses the
first part of a run resumed under the same version (a SLURM job requeued after preemption, see
:mod:`matsciml.trainer.slurm`). This one appends to the file instead, keeping its columns.

Its ``save_dir`` may be left unset: the CLI then puts the run under ``trainer.default_root_dir``
(:func:`resolve_save_dirs`), as Lightning's own default logger does, and under ``runs/`` when that
is unset too.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """Writes ``metrics.csv`` after the rows already there (new columns rewrite the header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)


#: where runs go when neither the logger's ``save_dir`` nor ``trainer.default_root_dir`` says
DEFAULT_SAVE_DIR = "runs"


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger, appending to an existing run's ``metrics.csv``.

    Args:
        save_dir: the folder of runs; ``None``: :data:`DEFAULT_SAVE_DIR` (the CLI first fills it
            from ``trainer.default_root_dir``). The other arguments are Lightning's.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike | None = None,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ):
        super().__init__(
            DEFAULT_SAVE_DIR if save_dir is None else save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


#: loggers whose folder is ``save_dir/name/version``, and their default ``name``
VERSIONED_LOGGERS = {"CSVLogger": "lightning_logs", "TensorBoardLogger": "lightning_logs"}


def versioned_logger_configs(trainer: Any) -> list[Any]:
    """The CSV and TensorBoard logger entries (``class_path``/``init_args``) of a parsed trainer config."""
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    return [
        logger
        for logger in loggers
        if getattr(logger, "class_path", None) is not None and logger.class_path.rpartition(".")[2] in VERSIONED_LOGGERS
    ]


def resolve_save_dirs(trainer: Any) -> None:
    """Give CSV/TensorBoard loggers without a ``save_dir`` the trainer's ``default_root_dir`` (else ``runs``).

    Run folders, checkpoints (which Lightning keeps in the first logger's folder) and step records
    then follow ``--trainer.default_root_dir``; an explicit ``save_dir`` still wins.
    """
    for logger in versioned_logger_configs(trainer):
        if logger.init_args.get("save_dir") is None:
            logger.init_args.save_dir = str(trainer.get("default_root_dir") or DEFAULT_SAVE_DIR)


def run_directory(logger: Any) -> Path | None:
    """``save_dir/name/version`` of a logger entry whose version is set, else ``None``."""
    args = logger.init_args
    if args.get("version") is None:
        return None
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    name = args.get("name", VERSIONED_LOGGERS[logger.class_path.rpartition(".")[2]]) or ""
    return Path(args.get("save_dir", ".")) / name / version
