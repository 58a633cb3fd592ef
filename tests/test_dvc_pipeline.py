"""A two-stage DVC pipeline (data convert -> fit) built from step records, reproduced by `dvc repro`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ase.io import write
from distributed.test_ddp import base_env
from helpers.ase_inputs import emt_frames

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(DVC is None, reason="dvc is not installed (pip install dvc)")]


def sh(cwd: Path, *command: str) -> str:
    env = base_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def fit_config(lr: float) -> dict:
    config = yaml.safe_load((ROOT / "configs/devset/s2ef-egnn.yaml").read_text())
    config["trainer"].update(max_epochs=2, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    config["model"]["init_args"]["lr"] = lr
    config["data"]["init_args"].update(
        train_path="data/train", val_path="data/train", test_path=None, predict_path=None
    )
    return config


def test_convert_then_fit_reproduces_with_dvc(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    write(repo / "frames.extxyz", emt_frames(12))
    (repo / "fit.yaml").write_text(yaml.safe_dump(fit_config(lr=3e-3)))

    # the steps, run once by hand; their records become the pipeline
    sh(repo, "matsciml", "data", "convert", "frames.extxyz", "data/train", "--task", "s2ef")
    sh(repo, "matsciml", "fit", "--config", "fit.yaml", "--trainer.logger.init_args.save_dir=runs")
    stages = {}
    for record, name in (("data/train.step.json", "convert"), ("runs/lightning_logs/version_0", "fit")):
        stages.update(yaml.safe_load(sh(repo, "matsciml", "runs", "dvc-stage", record, "--name", name))["stages"])
    assert stages["convert"]["outs"] == ["data/train"] and stages["convert"]["deps"] == ["frames.extxyz"]
    assert stages["fit"]["deps"] == ["data/train"]  # train and val are the same dataset
    assert stages["fit"]["outs"] == ["runs/lightning_logs/version_0/checkpoints"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))

    out = sh(repo, DVC, "repro")  # no dvc.lock yet: both stages run, convert first
    assert out.index("Running stage 'convert'") < out.index("Running stage 'fit'")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"convert", "fit"}
    assert "up to date" in sh(repo, DVC, "status")
    metrics = json.loads(sh(repo, DVC, "metrics", "show", "--json"))
    assert "val/energy_mae" in json.dumps(metrics)
    record = json.loads((repo / "runs/lightning_logs/version_0/step.json").read_text())
    assert record["status"] == "COMPLETED"

    # a changed parameter reruns fit only
    (repo / "fit.yaml").write_text(yaml.safe_dump(fit_config(lr=1e-3)))
    status = sh(repo, DVC, "status")
    assert "fit" in status and "convert" not in status
    out = sh(repo, DVC, "repro")
    assert "Running stage 'fit'" in out and "Running stage 'convert'" not in out
