"""One SLURM job, one run: a requeued job logs and resumes in the folder it started in.

Under SLURM, Lightning's ``SLURMEnvironment`` (``auto_requeue=True``) catches the warning signal
(``#SBATCH --signal=SIGUSR1@90``), saves ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``,
runs ``scontrol requeue`` and, when the job starts again, resumes from the newest such file there.
Left at its defaults that folder is the working directory, shared by every job started from it,
and each start gets a new logger version. :func:`pin_run_to_job` names the run after the job
instead (version ``slurm-<job id>``, ``<array job>_<task>`` for array jobs) and points
``default_root_dir`` at that run's folder, so a requeued job resumes its own checkpoint and keeps
logging into the same ``metrics.csv`` (:class:`matsciml.trainer.loggers.CSVLogger` appends).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment

from matsciml.trainer.loggers import run_directory, versioned_logger_configs


def job_identity() -> str | None:
    """``<job id>`` (``<array job id>_<task id>`` in an array), or ``None`` outside a SLURM job."""
    if not SLURMEnvironment.detect() or "SLURM_JOB_ID" not in os.environ:
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def pin_run_to_job(trainer: Any, job: str) -> None:
    """Set the logger version and ``default_root_dir`` of a parsed trainer config for SLURM job ``job``.

    Only what the user left unset changes; loggers other than CSV and TensorBoard are left alone.
    """
    run_dirs = []
    for logger in versioned_logger_configs(trainer):
        if logger.init_args.get("version") is None:
            logger.init_args.version = f"slurm-{job}"
        run_dirs.append(run_directory(logger))
    if run_dirs and trainer.get("default_root_dir") is None:
        trainer.default_root_dir = str(run_dirs[0])
