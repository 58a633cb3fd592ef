"""Loggers chosen in the config: CSV (default), TensorBoard, Weights & Biases (offline)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from distributed.test_ddp import base_env

from matsciml.cli.app import main
from matsciml.records.provenance import load_record

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--config",
    "configs/devset/is2re-egnn.yaml",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def fit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("matsciml")), "fit", *QUICK, *args],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tensorboard_logger_from_the_config(tmp_path):
    pytest.importorskip("tensorboardX", reason="neither tensorboard nor tensorboardX is installed")
    fit(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    record = load_record(run_dir)
    assert record["status"] == "COMPLETED" and record["links"]["tensorboard"]["log_dir"] == str(run_dir.resolve())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_wandb_offline_run_is_linked_both_ways(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed")
    fit(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.project=matsciml-test",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
        WANDB_SILENT="true",
    )
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


def test_default_root_dir_decides_where_runs_go(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "root"
    assert main(["fit", *QUICK, f"--trainer.default_root_dir={root}"]) == 0
    run_dir = root / "lightning_logs" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "metrics.csv").is_file()
    record = load_record(run_dir)
    assert record["step"] == "fit" and record["status"] == "COMPLETED"
    assert record["config"]["trainer"]["logger"]["init_args"]["save_dir"] == str(root)
    # a run from a checkpoint lives in a new folder: Lightning says the checkpoint callback's folder changed
    warnings.filterwarnings("ignore", message="The dirpath has changed")  # pytest restores the filters after
    assert (
        main(
            [
                "predict",
                "--config",
                "configs/devset/is2re-egnn.yaml",
                f"--ckpt_path={run_dir / 'checkpoints'}/last.ckpt",
                "--trainer.limit_predict_batches=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={root}",
            ]
        )
        == 0
    )
    predicted = root / "lightning_logs" / "version_1"
    assert load_record(predicted)["step"] == "predict" and (predicted / "predictions.npz").is_file()
    # an explicit save_dir still wins over default_root_dir
    assert (
        main(
            [
                "validate",
                "--config",
                "configs/devset/is2re-egnn.yaml",
                f"--ckpt_path={run_dir / 'checkpoints'}/last.ckpt",
                "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={root}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'own'}",
            ]
        )
        == 0
    )
    assert load_record(tmp_path / "own" / "lightning_logs" / "version_0")["step"] == "validate"


def test_runs_go_to_runs_without_default_root_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the devset paths, relative to the repository in the config, made absolute
    paths = [f"--data.init_args.{split}_path={ROOT / 'devsets' / 'is2re' / split}" for split in ("train", "val")]
    assert (
        main(
            [
                "fit",
                f"--config={ROOT / 'configs/devset/is2re-egnn.yaml'}",
                *QUICK[2:],
                *paths,
                "--data.init_args.test_path=null",
                "--data.init_args.predict_path=null",
            ]
        )
        == 0
    )
    run_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and load_record(run_dir)["status"] == "COMPLETED"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
