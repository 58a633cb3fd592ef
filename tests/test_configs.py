"""Every shipped config runs through the real CLI: devsets train, OC20 templates parse."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from matsciml.cli.app import main

ROOT = Path(__file__).resolve().parents[1]
DEVSET = sorted((ROOT / "configs" / "devset").glob("*.yaml"))
TEMPLATES = sorted((ROOT / "configs" / "oc20").glob("*.yaml"))
TRAINERS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--data.init_args.batch_size=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_one_config_per_model_and_task():
    names = {p.stem for p in DEVSET}
    assert names == {p.stem for p in TEMPLATES}
    for task in ("s2ef", "is2re"):
        assert {f"{task}-egnn", f"{task}-megnet", f"{task}-gala"} <= names


@pytest.mark.parametrize("path", DEVSET, ids=ids(DEVSET))
# validate --ckpt_path logs to a new version folder; Lightning notes the checkpoint folder moved
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_devset_config_trains_through_the_cli(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # devset paths are relative to the repository root
    logs = f"--trainer.logger.init_args.save_dir={tmp_path}"
    assert main(["fit", "--config", str(path), *QUICK, logs]) == 0
    out = capsys.readouterr().out
    assert "validation metrics after training" in out and "energy MAE" in out
    last = list(tmp_path.rglob("last.ckpt"))
    assert len(last) == 1
    assert (last[0].parent / "best.ckpt").is_file()  # the best validation by the task's monitor
    # the checkpoint validates and predicts through the CLI as well
    assert (
        main(
            [
                "validate",
                "--config",
                str(path),
                f"--ckpt_path={last[0]}",
                "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false",
                logs,
            ]
        )
        == 0
    )
    output = tmp_path / "predictions.npz"
    assert (
        main(
            [
                "predict",
                "--config",
                str(path),
                f"--ckpt_path={last[0]}",
                "--trainer.limit_predict_batches=2",
                "--data.init_args.batch_size=2",
                "--trainer.enable_progress_bar=false",
                logs,
                f"--prediction_writer.path={output}",
            ]
        )
        == 0
    )
    with np.load(output) as predictions:
        assert predictions["energy"].shape == (4,) and predictions["sid"].shape == (4,)
        if "s2ef" in path.stem:
            assert predictions["forces"].shape == (predictions["natoms"].sum(), 3)


@pytest.mark.parametrize("path", TEMPLATES, ids=ids(TEMPLATES))
def test_oc20_template_parses_with_every_trainer_file(path, capsys):
    text = path.read_text()
    assert "<OC20_ROOT>" in text  # a template, with its placeholder in plain sight
    for trainer in TRAINERS:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(path), "--config", str(trainer), "--print_config"])
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["data"]["init_args"]["train_path"].startswith("<OC20_ROOT>")
        assert config["trainer"] | yaml.safe_load(trainer.read_text())["trainer"] == config["trainer"]


def test_print_config_without_a_config_file(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    assert "trainer:" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # validate logs to a new version folder
def test_recipe_options_train_through_the_cli(tmp_path, monkeypatch, capsys):
    """EMA, ReduceLROnPlateau and the Huber loss from the command line; the run's best.ckpt exports."""
    monkeypatch.chdir(ROOT)
    recipe = [
        "--model.init_args.ema_decay=0.9",
        "--model.init_args.scheduler=plateau",
        "--model.init_args.plateau_patience=0",
        "--model.init_args.loss=huber",
        "--model.init_args.huber_delta=0.5",
        "--trainer.max_epochs=2",
    ]
    path = ROOT / "configs" / "devset" / "s2ef-egnn.yaml"
    logs = f"--trainer.logger.init_args.save_dir={tmp_path}"
    assert main(["fit", "--config", str(path), *QUICK, *recipe, logs]) == 0
    capsys.readouterr()
    (best,) = tmp_path.rglob("best.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["ema_decay"], hparams["scheduler"], hparams["loss"]) == (0.9, "plateau", "huber")
    assert "current_model_state" in checkpoint  # saved by the EMA callback: state_dict holds the average
    (scheduler,) = checkpoint["lr_schedulers"]
    assert "best" in scheduler and "num_bad_epochs" in scheduler  # ReduceLROnPlateau's state
    # validating the averaged checkpoint: the EMA callback has nothing to restore outside fit, and says nothing
    assert main(["validate", "--config", str(path), f"--ckpt_path={best}", "--trainer.limit_val_batches=1", logs]) == 0
    run = best.parent.parent
    assert main(["export", str(run), "--which", "best", "--out", str(tmp_path / "best.msml")]) == 0
