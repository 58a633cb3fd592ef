"""SLURM requeue on preemption: the job saves, is requeued, and resumes as the same run.

A fake ``scontrol`` stands in for SLURM: it records the requeue request and kills the job, as
SLURM does when it requeues. The same command line then runs again, as the requeued job would.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed.test_ddp import base_env

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 3, 4

pytestmark = pytest.mark.slow

FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$REQUEUE_LOG"
kill -9 $PPID
"""


def slurm_job_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(FAKE_SCONTROL)
    scontrol.chmod(0o755)
    return base_env(
        SLURM_JOB_ID="777",
        SLURM_JOB_NAME="matsciml-requeue",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
        PATH=f"{bin_dir}:{base_env()['PATH']}",
        PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",  # this checkout's matsciml, not the installed one
        REQUEUE_LOG=str(tmp_path / "requeue.log"),
    )


def test_requeued_job_resumes_from_its_checkpoint_in_the_same_run(tmp_path):
    signal_at = {
        "class_path": "helpers.interrupts.SignalAtStep",
        "init_args": {"step": 6, "marker": str(tmp_path / "signalled")},
    }
    cmd = [
        str(Path(sys.executable).with_name("matsciml")),
        "fit",
        "--config",
        "configs/devset/is2re-egnn.yaml",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.callbacks+={json.dumps(signal_at)}",
    ]
    env = slurm_job_env(tmp_path)

    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert first.returncode == -9, first.stderr[-3000:]  # killed by "SLURM" after the requeue request
    assert (tmp_path / "requeue.log").read_text().split() == ["requeue", "777"]
    run_dir = tmp_path / "runs" / "lightning_logs" / "slurm-777"  # the run is named after the job
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    restored = f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}"
    assert restored in second.stderr + second.stdout
    assert [p.name for p in run_dir.parent.iterdir()] == ["slurm-777"]  # one run, not one per start
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == EPOCHS * BATCHES and last["epoch"] == EPOCHS - 1
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # the history from before the requeue is kept: validation of every epoch, training steps from step 0
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/energy_mae")}) == list(range(EPOCHS))
    assert min(int(r["step"]) for r in rows if r.get("train/loss_step")) == 0
    # and one step record, continued by the requeued job
    record = json.loads((run_dir / "step.json").read_text())
    assert record["run_id"] == "slurm-777" and record["status"] == "COMPLETED"
    assert [r["checkpoint"] for r in record["resumes"]] == [str((run_dir / "hpc_ckpt_1.ckpt").resolve())]
