"""``matsciml fit|validate|test|predict``: the LightningCLI over tasks and data modules.

Model and data are chosen in subclass mode (``class_path``/``init_args``), so any
:class:`~matsciml.tasks.AtomisticTask` and energy model, including a user's own, runs from
YAML. What the data knows is linked into the task instead of being repeated in configs:

* ``data.cutoff`` -> the energy model's ``cutoff`` (the radius graph and the model agree);
* the training split's element set -> ``model.species`` (checked against the embedding);
* the training split's target statistics -> ``model.statistics`` (the normaliser);
* the training split's mean neighbour count on its radius graph -> the energy model's
  ``avg_num_neighbors``, for models that take one (NequIP); jsonargparse skips the link for others.

``predict`` writes ``predictions.npz`` (sid, fid, energy, natoms, forces) to the run folder, or
to ``--prediction_writer.path``.

Before the Trainer is built, an accelerator the machine lacks fails with what is missing
(:mod:`matsciml.trainer.accelerators`), and a ``fit`` inside a SLURM job is pinned to the job
(:mod:`matsciml.trainer.slurm`) so a requeued job resumes and logs where it started. A ``fit`` given
``--ckpt_path <run>/checkpoints/last.ckpt`` continues that run in its folder (:mod:`matsciml.trainer.resume`).
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from matsciml.artifacts.trust import check_checkpoint_classes
from matsciml.cli.errors import ConfigError, input_error
from matsciml.data.datamodules import AtomisticDataModule
from matsciml.records.provenance import require_clean_checkout
from matsciml.records.step_recorder import StepRecorder
from matsciml.tasks.base import AtomisticTask
from matsciml.tasks.best_checkpoint import BestCheckpoint
from matsciml.tasks.divergence import DivergenceGuard, TrainingDiverged
from matsciml.tasks.plots import PlotCallback
from matsciml.tasks.predictions import PredictionWriter
from matsciml.tasks.report import MetricsReport
from matsciml.trainer.accelerators import check_accelerator
from matsciml.trainer.loggers import resolve_save_dirs, run_directory, versioned_logger_configs
from matsciml.trainer.resume import ResumeState, pin_run_to_checkpoint, step_checkpoint
from matsciml.trainer.slurm import job_identity, pin_run_to_job

SUBCOMMANDS = ("fit", "validate", "test", "predict")
__all__ = ["MatSciMLCLI", "TrainingDiverged", "run"]  # run raises TrainingDiverged for a diverged fit


def _species(data: AtomisticDataModule) -> list[int] | None:
    return data.species


def _statistics(data: AtomisticDataModule) -> dict | None:
    return data.target_statistics


def _avg_num_neighbors(data: AtomisticDataModule) -> float | None:
    return data.avg_num_neighbors


class MatSciMLCLI(LightningCLI):
    """LightningCLI with matsciml's links and defaults (CSV logs under ``default_root_dir``, else ``runs/``)."""

    def __init__(self, *args: Any, extra_callbacks: list | None = None, **kwargs: Any):
        self.extra_callbacks = list(extra_callbacks or [])  # set first: the Trainer is built inside __init__
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.cutoff", "model.init_args.model.init_args.cutoff")
        parser.link_arguments("data", "model.init_args.species", compute_fn=_species, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.statistics", compute_fn=_statistics, apply_on="instantiate")
        parser.link_arguments(
            "data",
            "model.init_args.model.init_args.avg_num_neighbors",
            compute_fn=_avg_num_neighbors,
            apply_on="instantiate",
        )
        parser.add_lightning_class_args(MetricsReport, "metrics_report")
        # on by default: a non-finite step stops the run before it is applied (divergence_guard: {...})
        parser.add_lightning_class_args(DivergenceGuard, "divergence_guard")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_argument(
            "--require_clean",
            "--require-clean",
            type=bool,
            default=False,
            help="refuse to start from a git checkout with uncommitted changes",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit: delete the run folder first if the logger's version names an existing one",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            "--checkpoint-every-n-steps",
            type=int | None,
            default=None,
            help="fit: also save checkpoints/last.ckpt every N training steps, mid-epoch (for resuming)",
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning parses the checkpoint's hyper-parameters with jsonargparse, which imports every
        # class_path in them: check them all against the trusted modules first (matsciml.artifacts.trust)
        if self.config.get("subcommand"):
            check_checkpoint_classes(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("require_clean"):
            require_clean_checkout()
        check_accelerator(config.trainer.accelerator)
        resolve_save_dirs(config.trainer)  # first: the run folder follows --trainer.default_root_dir
        job = job_identity()
        if self.subcommand == "fit" and config.get("overwrite"):
            _clear_named_run_dirs(config.trainer)
        resume = False
        if self.subcommand == "fit" and job is not None:
            pin_run_to_job(config.trainer, job)
            resume = True
        elif self.subcommand == "fit" and not config.get("overwrite"):
            resume = pin_run_to_checkpoint(config.trainer, config.get("ckpt_path")) is not None
        if resume:  # a resumed run starts with the same config, in the folder it has already saved it to
            self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": True}
        if self.subcommand is not None:
            resolved = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
            self.recorder = StepRecorder(
                self.subcommand,
                config=resolved,
                command=["matsciml", *sys.argv[1:]],
                run_id=f"slurm-{job}" if job is not None else None,
                resume=resume,
            )

    def instantiate_classes(self) -> None:
        # a value the task, model or data module refuses while being built is the config's error
        # (jsonargparse wraps it as "Call to compute_fn of link ... failed: ..."; keep the cause)
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if input_error(err) is not None:  # a dataset's or checkpoint's error says what it is
                raise
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ConfigError(f"config refused: {cause}") from err

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand is not None:
            self.trainer.callbacks.append(self.recorder)
            # in every subcommand: validate/predict from a fit checkpoint then know the state it carries
            self.trainer.callbacks.insert(0, ResumeState())  # first: sees each batch before a checkpoint is taken
        if self.subcommand == "fit":
            every = self.config.fit.get("checkpoint_every_n_steps")
            if every is not None:
                self.trainer.callbacks.append(step_checkpoint(every))
        self.trainer.callbacks.extend(self.extra_callbacks)


def _clear_named_run_dirs(trainer: Any) -> None:
    """Delete the folders of loggers with an explicit version (a reproduction starts afresh there)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank != 0 or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return  # only global rank 0 (Lightning starts local ranks >= 1 after this point)
    for logger in versioned_logger_configs(trainer):
        folder = run_directory(logger)
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder)


def run(argv: list[str], extra_callbacks: list | None = None) -> None:
    """Run one LightningCLI subcommand, e.g. ``["fit", "--config", "configs/devset/s2ef-egnn.yaml"]``.

    ``extra_callbacks`` join the Trainer's (live objects a config cannot name, e.g. ``hpo``'s pruning).
    """
    trainer_defaults: dict[str, Any] = {
        # Lightning's CSVLogger, appending to metrics.csv when a run continues in its folder
        # under --trainer.default_root_dir, else runs/ (its save_dir is filled in before instantiation)
        "logger": {"class_path": "matsciml.trainer.loggers.CSVLogger"},
        # checkpoints/last.ckpt always names the newest checkpoint of a run (never last-v1.ckpt, also
        # when a resumed run or --checkpoint_every_n_steps writes it too), best.ckpt the best
        # validation by the task's monitor metric; PlotCallback: PNGs, parity plots, learning curve
        "callbacks": [ModelCheckpoint(save_last=True, enable_version_counter=False), BestCheckpoint(), PlotCallback()],
        # checkpoints written beside their path and renamed: a full disk keeps the previous one
        "plugins": [{"class_path": "matsciml.trainer.checkpoint_io.AtomicCheckpointIO"}],
    }
    # LightningCLI reads sys.argv (given args next to a command line earn a warning), so
    # present argv as the command line for the duration of the run.
    # Lightning 2.6 calls a jsonargparse API deprecated in 4.4x; the warning is not the user's to act on.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    # Lightning 2.6 with torch >= 2.10: a FutureWarning from inside Lightning's loader code.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    saved = sys.argv
    # argv[0] stays the program that runs: Lightning's DDP launcher starts the other ranks by
    # running `python sys.argv[0] sys.argv[1:]` again (a bare "matsciml" would resolve to a folder)
    program = saved[0] if saved and Path(saved[0]).is_file() else "matsciml"
    sys.argv = [program, *argv]
    try:
        MatSciMLCLI(
            AtomisticTask,
            AtomisticDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            auto_configure_optimizers=True,
            extra_callbacks=extra_callbacks,
            # a refused key or value raises (matsciml.cli.errors makes it one line) instead of usage + exit
            parser_kwargs={"exit_on_error": False},
        )
    finally:
        sys.argv = saved
