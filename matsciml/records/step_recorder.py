"""The step record of a Lightning run (``fit``, ``validate``, ``test``, ``predict``), as a callback.

:class:`StepRecorder` opens a :class:`~matsciml.records.provenance.StepRecord` in the run directory
(``trainer.log_dir``) when the run starts, on global rank 0 only (one record per step under DDP,
with the world size in it), and closes it when the run ends: ``COMPLETED`` with outputs and
metrics, ``FAILED`` with the error, or ``INTERRUPTED`` (Ctrl-C). Next to ``step.json`` it leaves
the files a DVC stage points at: ``params.yaml`` (the resolved config) and ``metrics.json``.

A run resumed in its folder (``--ckpt_path <run>/checkpoints/last.ckpt``, a requeued SLURM job)
continues the record there: ``RESUMED`` with the checkpoint, step and time of each resume. After
each batch it refreshes the record's heartbeat, at most every :data:`HEARTBEAT_S` seconds, so
``matsciml runs list`` can tell a run whose process died (:mod:`matsciml.records.runs`).

A fit of a task started from another model (its ``init_from``) has that parent among the inputs
(``role="parent"``, with its digest) and the record's ``lineage`` holds the parent's chain and what
was loaded from it (:mod:`matsciml.records.lineage`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from matsciml.data.errors import DataError
from matsciml.data.fingerprint import dataset_digest
from matsciml.records.lineage import PACKAGE, run_lineage, run_report
from matsciml.records.provenance import (
    COMPLETED,
    FAILED,
    INTERRUPTED,
    RECORD_NAME,
    RESUMED,
    StepRecord,
    write_atomically,
)

PARAMS_NAME, METRICS_NAME = "params.yaml", "metrics.json"
#: metrics where larger is better; all others are errors or losses
_HIGHER_IS_BETTER = ("cosine",)
#: seconds between two heartbeats written to the record (each rewrites step.json)
HEARTBEAT_S = 30.0


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _run_directory(trainer: pl.Trainer) -> Path:
    """The run's folder: the CSV/TensorBoard log_dir, else ``save_dir/name/version`` of the first
    logger (a W&B run's id), which is where Lightning puts the run's checkpoints."""
    log_dir = trainer.log_dir  # collective under DDP
    first = trainer.loggers[0] if trainer.loggers else None
    if first is None or type(first).__name__ in ("TensorBoardLogger", "CSVLogger"):
        return Path(log_dir or trainer.default_root_dir)
    version = first.version if isinstance(first.version, str) else f"version_{first.version}"
    return Path(first.save_dir or trainer.default_root_dir) / str(first.name) / version


def _logger_links(trainer: pl.Trainer, run_id: str) -> dict[str, Any]:
    """Where the run's loggers keep it; a W&B run also learns this record's ``run_id``."""
    links: dict[str, Any] = {}
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "WandbLogger":
            run = logger.experiment  # creates the W&B run (offline with WANDB_MODE=offline)
            run.config.update({"matsciml_run_id": run_id}, allow_val_change=True)
            links["wandb"] = {
                "id": run.id,
                "project": run.project,
                "name": run.name,
                "dir": run.dir,
                "url": getattr(run, "url", None),
            }
        elif kind in ("TensorBoardLogger", "CSVLogger"):
            links[kind.removesuffix("Logger").lower()] = {"log_dir": str(Path(logger.log_dir).resolve())}
    return links


class StepRecorder(pl.Callback):
    """Keeps the step record of one Trainer run.

    Args:
        step: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
        config: the resolved configuration (plain data), saved in the record and ``params.yaml``.
        command: the command line (default ``sys.argv``).
        run_id: a stable run identity (e.g. the SLURM job's), else a random one.
        resume: continue the record already in the run folder, if there is one (a resumed run).
    """

    def __init__(
        self,
        step: str,
        config: dict[str, Any] | None = None,
        command: list[str] | None = None,
        run_id: str | None = None,
        resume: bool = False,
    ):
        self.step, self.config, self.command, self.run_id = step, config or {}, command, run_id
        self.resume = resume
        self.record: StepRecord | None = None
        self._last_beat = -math.inf
        self.history: list[dict[str, float]] = []  # validation metrics per epoch, for the best values

    # -- start ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        directory = _run_directory(trainer)  # collective under DDP: every rank asks
        if not trainer.is_global_zero or self.record is not None:
            return
        if self.resume and (directory / RECORD_NAME).is_file():
            self.record = StepRecord.reopen(directory)  # its command stays the run's; the resume keeps its own
            self._heartbeat(force=True)
            write_atomically(directory / PARAMS_NAME, yaml.safe_dump(self.config, sort_keys=False))
            return
        record = StepRecord(
            directory,
            self.step,
            command=self.command,
            config=self.config,
            run_id=self.run_id,
            world_size=trainer.world_size,
        )
        datamodule = trainer.datamodule
        for split, paths in (getattr(datamodule, "paths", None) or {}).items():
            for path in paths if isinstance(paths, list) else [] if paths is None else [paths]:  # several datasets
                record.add_input(f"data.{split}_path", path, kind="dataset", digest=self._dataset_digest(path))
        record.data["links"].update(_logger_links(trainer, record.data["run_id"]))
        self.record = record
        self._note_parent(record, pl_module)
        self._heartbeat(force=True)
        write_atomically(record.directory / PARAMS_NAME, yaml.safe_dump(self.config, sort_keys=False))

    def _note_parent(self, record: StepRecord, pl_module: pl.LightningModule) -> None:
        """A fit started from another model (``init_from``): the parent as an input, and its chain.

        Only a fit reads the parent (validate, test, predict of a fine-tuned checkpoint do not).
        """
        init_from = getattr(pl_module, "init_from", None)
        if init_from is None or self.step != "fit":
            return
        lineage = run_lineage(init_from, getattr(pl_module, "init_report", None))
        parent = lineage["parent"]
        kind = "model" if parent["kind"] == PACKAGE else "checkpoint"
        record.add_input("parent", parent["path"], kind=kind, digest=parent["digest"])
        record.data["lineage"] = lineage

    def _note_report(self, pl_module: pl.LightningModule) -> None:
        """What was loaded from the parent: the task knows it once its optimiser is configured."""
        report = getattr(pl_module, "init_report", None)
        if self.record is None or report is None or "lineage" not in self.record.data:
            return
        lineage = self.record.data["lineage"]
        update = run_report(report)
        if (lineage["counts"], lineage["names"]) != (update["counts"], update["names"]):
            lineage.update(update)
            self.record.save()

    @staticmethod
    def _dataset_digest(path: str | os.PathLike) -> str | None:
        try:
            return dataset_digest(path)
        except DataError:  # unreadable here; the data module reports it with file and record
            return None

    # -- during --------------------------------------------------------------------------
    def _heartbeat(self, force: bool = False) -> None:
        if self.record is not None and (force or time.monotonic() - self._last_beat >= HEARTBEAT_S):
            self._last_beat = time.monotonic()
            self.record.beat()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._heartbeat()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._heartbeat()

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._heartbeat()

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._heartbeat()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the loops' counters are restored only now (after on_fit_start)
        if self.record is not None and self.record.status == RESUMED:
            self.record.note_resume(trainer.ckpt_path, trainer.global_step, trainer.current_epoch, self.command)

    def _note_checkpoint(self, trainer: pl.Trainer) -> None:
        """The checkpoint the run starts from: Lightning knows it only after ``setup``."""
        path = trainer.ckpt_path
        if self.record is None or not path or not Path(path).is_file():
            return
        if not any(i["role"] == "ckpt_path" for i in self.record.data["inputs"]):
            self.record.add_input("ckpt_path", path, kind="checkpoint")
            self.record.save()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_checkpoint(trainer)
        self._note_report(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_checkpoint(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_checkpoint(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._note_checkpoint(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.record is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **values})

    # -- end -----------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.record is not None and self.record.status not in (FAILED, INTERRUPTED):
            self._close(trainer, COMPLETED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.record is not None:
            self._close(trainer, INTERRUPTED if isinstance(exception, KeyboardInterrupt) else FAILED, exception)

    def _close(self, trainer: pl.Trainer, status: str, error: BaseException | None = None) -> None:
        record = self.record
        self._note_report(trainer.lightning_module)
        final = {k: _number(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        record.set_metrics(final=final, best=self._best(trainer))
        self._add_outputs(trainer, record)
        write_atomically(record.directory / METRICS_NAME, json.dumps(final, indent=1, sort_keys=True) + "\n")
        record.add_output("metrics", record.directory / METRICS_NAME, kind="metrics")
        record.add_output("params", record.directory / PARAMS_NAME, kind="params")
        record.finish(status, error)

    def _best(self, trainer: pl.Trainer) -> dict[str, Any]:
        best: dict[str, Any] = {}
        for name in sorted({k for row in self.history for k in row if k.startswith("val/")}):
            rows = [r for r in self.history if r.get(name) is not None]
            if not rows or name.endswith("_baseline"):
                continue
            pick = max if any(word in name for word in _HIGHER_IS_BETTER) else min
            row = pick(rows, key=lambda r: r[name])
            best[name] = {"value": row[name], "epoch": row["epoch"], "step": row["step"]}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
            score = checkpoint.best_model_score
            best["checkpoint"] = {
                "path": str(Path(checkpoint.best_model_path).resolve()),
                "monitor": checkpoint.monitor,
                "score": None if score is None else _number(score),
            }
        return best

    @staticmethod
    def _add_outputs(trainer: pl.Trainer, record: StepRecord) -> None:
        for callback in trainer.checkpoint_callbacks:
            directory = getattr(callback, "dirpath", None)
            if directory and Path(directory).is_dir():
                for path in sorted(Path(directory).glob("*.ckpt")):
                    record.add_output(f"checkpoint:{path.stem}", path, kind="checkpoint")
        for callback in trainer.callbacks:
            written = getattr(callback, "written_path", None)  # PredictionWriter
            if written is not None and Path(written).is_file():
                record.add_output("predictions", written, kind="predictions")
        for logger in trainer.loggers:
            metrics_csv = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
            if metrics_csv.is_file():
                record.add_output("metrics_history", metrics_csv, kind="metrics")
        config = record.directory / "config.yaml"  # LightningCLI's SaveConfigCallback
        if config.is_file():
            record.add_output("config", config, kind="params")
        for path in sorted(record.directory.glob("*.png")):  # PlotCallback's parity plots and learning curve
            record.add_output(f"plot:{path.stem}", path, kind="plot")
