"""Loggers chosen in the config: CSV (default), TensorBoard, Weights & Biases (offline)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from distributed.test_ddp import base_env

from matsciml.provenance import load_record

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", "configs/devset/is2re-egnn.yaml", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
         "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]


def fit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(Path(sys.executable).with_name("matsciml")), "fit", *QUICK, *args], cwd=ROOT,
                          env=base_env(**env), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tensorboard_logger_from_the_config(tmp_path):
    pytest.importorskip("tensorboardX", reason="neither tensorboard nor tensorboardX is installed")
    fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}")
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    record = load_record(run_dir)
    assert record["status"] == "COMPLETED" and record["links"]["tensorboard"]["log_dir"] == str(run_dir.resolve())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_wandb_offline_run_is_linked_both_ways(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed")
    fit(tmp_path, "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.project=matsciml-test", f"--trainer.logger.init_args.save_dir={tmp_path}",
        WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    records = list(tmp_path.rglob("step.json"))
    assert len(records) == 1
    record = load_record(records[0])
    wandb = record["links"]["wandb"]
    # the record sits where Lightning put the run's checkpoints: save_dir/project/<W&B run id>
    assert records[0].parent == tmp_path / "matsciml-test" / wandb["id"]
    assert (records[0].parent / "checkpoints" / "last.ckpt").is_file()
    assert record["status"] == "COMPLETED" and wandb["project"] == "matsciml-test"
    offline = list(tmp_path.glob(f"wandb/offline-run-*-{wandb['id']}"))
    assert len(offline) == 1  # the offline W&B run, to sync later with `wandb sync`
    # the W&B run's config holds the record's id (offline, it is in the run's transaction log)
    log = (offline[0] / f"run-{wandb['id']}.wandb").read_bytes()
    assert b"matsciml_run_id" in log and record["run_id"].encode() in log
    assert json.dumps(record["metrics"]["final"])  # metrics still recorded
