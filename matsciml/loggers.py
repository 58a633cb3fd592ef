"""The default CSV logger, made resumable: a run continued in its own folder keeps its history.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its folder already exists, which loses the
first part of a run resumed under the same version (a SLURM job requeued after preemption, see
:mod:`matsciml.slurm`). This one appends to the file instead, keeping its columns.
"""

from __future__ import annotations

import csv
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


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger (same arguments), appending to an existing run's ``metrics.csv``."""

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
    return [logger for logger in loggers if getattr(logger, "class_path", None) is not None
            and logger.class_path.rpartition(".")[2] in VERSIONED_LOGGERS]


def run_directory(logger: Any) -> Path | None:
    """``save_dir/name/version`` of a logger entry whose version is set, else ``None``."""
    args = logger.init_args
    if args.get("version") is None:
        return None
    version = args.version if isinstance(args.version, str) else f"version_{args.version}"
    name = args.get("name", VERSIONED_LOGGERS[logger.class_path.rpartition(".")[2]]) or ""
    return Path(args.get("save_dir", ".")) / name / version
