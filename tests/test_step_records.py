"""Step records of CLI runs: complete and schema-valid on success, failure, Ctrl-C and under DDP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from distributed.test_ddp import base_env

from matsciml.cli.app import main
from matsciml.data.fingerprint import dataset_digest
from matsciml.records import provenance, runs
from matsciml.records.provenance import StepRecord, load_record, load_schema, sha256_file

# the legacy DGL environment (make test-dgl) collects every module but lacks the test extra
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--config",
    "configs/devset/is2re-egnn.yaml",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def validate(record: dict) -> None:
    jsonschema.validate(record, load_schema(), format_checker=jsonschema.FormatChecker())


def only_record(save_dir: Path) -> dict:
    paths = list(save_dir.rglob("step.json"))
    assert len(paths) == 1, paths
    record = load_record(paths[0])
    validate(record)
    return record


def cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``matsciml fit`` in its own process (Ctrl-C and failures end it), helpers importable."""
    env = base_env(PYTHONPATH=str(ROOT / "tests"))
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("matsciml")),
            "fit",
            *QUICK,
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_fit_leaves_a_complete_record(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 0
    record = only_record(tmp_path)
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert record["status"] == "COMPLETED" and record["error"] is None and record["step"] == "fit"
    assert record["command"][:2] == ["matsciml", "fit"] and record["duration_s"] > 0
    assert record["config"]["trainer"]["max_epochs"] == 2
    assert record["config"]["model"]["init_args"]["model"]["class_path"] == "matsciml.models.EGNN"
    inputs = {i["role"]: i for i in record["inputs"]}
    assert inputs["data.train_path"]["digest"] == dataset_digest(ROOT / "devsets/is2re/train")
    assert inputs["data.train_path"]["digest"].startswith("sha256:")
    outputs = {o["role"]: o for o in record["outputs"]}
    assert {"checkpoint:last", "metrics", "params", "metrics_history", "config"} <= set(outputs)
    for output in outputs.values():
        assert output["digest"] == sha256_file(output["path"])
    final = record["metrics"]["final"]
    assert final["val/energy_mae"] > 0 and "train/loss_epoch" in final
    assert set(record["metrics"]["best"]["val/energy_mae"]) == {"value", "epoch", "step"}
    assert record["metrics"]["best"]["val/energy_mae"]["value"] <= final["val/energy_mae"]
    assert json.loads((run_dir / "metrics.json").read_text()) == final
    assert yaml.safe_load((run_dir / "params.yaml").read_text()) == record["config"]
    git = record["code"]["git"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert git["commit"] == head.strip() and isinstance(git["dirty"], bool)
    env = record["environment"]
    assert env["world_size"] == 1 and "torch" in env["packages"] and "lightning" in env["packages"]


def test_failed_run_says_why(tmp_path):
    raise_at = {"class_path": "helpers.interrupts.RaiseAtStep", "init_args": {"step": 2, "message": "boom at 2"}}
    done = cli(tmp_path, f"--trainer.callbacks+={json.dumps(raise_at)}")
    assert done.returncode != 0
    record = only_record(tmp_path)
    assert record["status"] == "FAILED" and record["ended_at"] is not None
    assert record["error"]["type"] == "RuntimeError" and record["error"]["message"] == "boom at 2"
    assert "interrupts.py" in record["error"]["traceback"]  # where it was raised


def test_ctrl_c_marks_the_run_interrupted(tmp_path):
    sigint = {
        "class_path": "helpers.interrupts.SignalAtStep",
        "init_args": {"step": 2, "marker": str(tmp_path / "sent"), "signal": "SIGINT"},
    }
    done = cli(tmp_path / "runs", f"--trainer.callbacks+={json.dumps(sigint)}")
    assert done.returncode == 1, done.stderr[-2000:]  # Lightning's graceful shutdown
    record = only_record(tmp_path / "runs")
    assert record["status"] == "INTERRUPTED" and record["error"]["type"] == "KeyboardInterrupt"


@pytest.mark.slow
def test_ddp_writes_one_record_with_the_world_size(tmp_path):
    done = cli(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    record = only_record(tmp_path)
    assert record["status"] == "COMPLETED" and record["environment"]["world_size"] == 2


def test_require_clean_refuses_a_dirty_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(provenance, "git_state", lambda path=None: {"root": "/repo", "commit": "abc", "dirty": True})
    assert main(["fit", *QUICK, "--require-clean=true", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    assert "has uncommitted changes" in capsys.readouterr().err
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_git_state_of_a_checkout(tmp_path):
    assert provenance.git_state(tmp_path) is None  # not a checkout
    run = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    run("add", "a.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = provenance.git_state(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "a.txt").write_text("2")
    assert provenance.git_state(tmp_path)["dirty"] is True


def test_record_is_rewritten_atomically_and_ends_once(tmp_path):
    record = StepRecord(tmp_path / "run", "data convert", command=["matsciml", "data", "convert"])
    record.save()
    validate(load_record(tmp_path / "run"))
    assert load_record(tmp_path / "run")["status"] == "RUNNING"
    (tmp_path / "in.txt").write_text("x")
    record.add_input("source", tmp_path / "in.txt")
    record.finish("COMPLETED")
    saved = load_record(tmp_path / "run")
    validate(saved)
    assert saved["inputs"][0]["digest"] == sha256_file(tmp_path / "in.txt")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["step.json"]  # no temporary files left
    with pytest.raises(ValueError, match="COMPLETED, FAILED or INTERRUPTED"):
        record.finish("RUNNING")


def test_data_convert_keeps_a_record_beside_the_dataset(tmp_path):
    from ase.io import write
    from helpers.ase_inputs import emt_frames

    source = tmp_path / "frames.extxyz"
    write(source, emt_frames(6))
    destination = tmp_path / "data" / "train"
    assert main(["data", "convert", str(source), str(destination), "--task", "s2ef"]) == 0
    record = load_record(tmp_path / "data" / "train.step.json")
    validate(record)
    assert record["status"] == "COMPLETED" and record["step"] == "data convert"
    assert record["command"] == ["matsciml", "data", "convert", str(source), str(destination), "--task", "s2ef"]
    assert record["inputs"][0]["digest"] == sha256_file(source)
    assert record["outputs"][0]["digest"] == dataset_digest(destination)
    assert not (destination / "step.json").exists()  # the dataset holds only its shards

    bad = tmp_path / "bad.extxyz"
    bad.write_text("not an extxyz file\n")
    assert main(["data", "convert", str(bad), str(tmp_path / "data" / "bad"), "--task", "s2ef"]) == 2
    failed = load_record(tmp_path / "data" / "bad.step.json")
    validate(failed)
    assert failed["status"] == "FAILED" and failed["error"]["type"] == "DataError"
    assert "bad.extxyz" in failed["error"]["message"]
    assert not (tmp_path / "data" / "bad").exists()
    frame = runs.load(tmp_path / "data")
    assert sorted(frame["run"]) == ["bad", "train"] and set(frame["step"]) == {"data convert"}


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_predict_records_its_checkpoint_and_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path / 'fit'}"]) == 0
    checkpoint = next((tmp_path / "fit").rglob("last.ckpt"))
    assert (
        main(
            [
                "predict",
                "--config",
                "configs/devset/is2re-egnn.yaml",
                f"--ckpt_path={checkpoint}",
                "--trainer.limit_predict_batches=2",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'predict'}",
            ]
        )
        == 0
    )
    record = only_record(tmp_path / "predict")
    assert record["step"] == "predict" and record["status"] == "COMPLETED"
    inputs = {i["role"]: i for i in record["inputs"]}
    assert inputs["ckpt_path"]["digest"] == sha256_file(checkpoint)
    outputs = {o["role"]: o for o in record["outputs"]}
    assert outputs["predictions"]["digest"] == sha256_file(outputs["predictions"]["path"])
    assert Path(outputs["predictions"]["path"]).name == "predictions.npz"
