"""Parity plots and learning curves: drawn by real CLI runs, listed in their step records, and
showing the MAEs the task logged."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed.test_ddp import base_env
from matplotlib.image import imread

from matsciml.cli.app import main
from matsciml.records import plots
from matsciml.records.provenance import load_record, sha256_file

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def fit(save_dir: Path, task: str) -> Path:
    """A two-epoch fit on a devset from the repository root; its run directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # devset paths in the configs are relative to the repository root
        assert (
            main(
                [
                    "fit",
                    "--config",
                    f"configs/devset/{task}-egnn.yaml",
                    *QUICK,
                    f"--trainer.logger.init_args.save_dir={save_dir}",
                ]
            )
            == 0
        )
    return save_dir / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def s2ef_run(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("s2ef"), "s2ef")


@pytest.fixture(scope="module")
def is2re_run(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("is2re"), "is2re")


def assert_picture(path: Path) -> np.ndarray:
    pixels = imread(path)  # fails on a truncated or non-PNG file
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= 300
    assert pixels[..., :3].var() > 0  # not blank
    return pixels


def plot_outputs(record: dict) -> dict[str, dict]:
    return {o["role"]: o for o in record["outputs"] if o["kind"] == "plot"}


def test_fit_draws_parity_and_learning_curve_with_the_logged_maes(s2ef_run):
    record = load_record(s2ef_run / "step.json")
    outputs = plot_outputs(record)
    assert set(outputs) == {"plot:parity_val", "plot:learning_curve"}
    for output in outputs.values():
        assert output["digest"] == sha256_file(output["path"]) and output["digest"].startswith("sha256:")
    parity = assert_picture(s2ef_run / "parity_val.png")
    assert parity.shape[1] > 1.5 * parity.shape[0]  # two panels: energy and forces
    assert_picture(s2ef_run / "learning_curve.png")
    final = record["metrics"]["final"]  # the last (second) epoch's validation metrics
    shown = plots.read_numbers(s2ef_run / "parity_val.png")
    assert set(shown) == {"energy_mae", "force_mae"}
    assert shown["energy_mae"] == pytest.approx(final["val/energy_mae"], rel=1e-4)
    assert shown["force_mae"] == pytest.approx(final["val/force_mae"], rel=1e-4)
    curve = plots.read_numbers(s2ef_run / "learning_curve.png")
    assert curve["val/energy_mae"] == pytest.approx(final["val/energy_mae"], rel=1e-6)
    assert curve["train/loss_epoch"] == pytest.approx(final["train/loss_epoch"], rel=1e-6)
    assert not list(s2ef_run.glob(".*.tmp"))  # written through a temporary name


def test_is2re_parity_has_an_energy_panel_only(is2re_run):
    shown = plots.read_numbers(is2re_run / "parity_val.png")
    assert set(shown) == {"energy_mae"}
    assert shown["energy_mae"] == pytest.approx(
        load_record(is2re_run / "step.json")["metrics"]["final"]["val/energy_mae"], rel=1e-4
    )
    parity = assert_picture(is2re_run / "parity_val.png")
    assert parity.shape[1] < 1.3 * parity.shape[0]


# test --ckpt_path logs to a new version folder; Lightning notes the checkpoint folder moved
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_test_step_draws_a_test_parity_plot(s2ef_run, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    checkpoint = s2ef_run / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "test",
                "--config",
                "configs/devset/s2ef-egnn.yaml",
                f"--ckpt_path={checkpoint}",
                "--trainer.limit_test_batches=2",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
        == 0
    )
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert_picture(run_dir / "parity_test.png")
    assert not (run_dir / "learning_curve.png").exists()
    record = load_record(run_dir / "step.json")
    assert set(plot_outputs(record)) == {"plot:parity_test"}
    shown = plots.read_numbers(run_dir / "parity_test.png")
    assert shown["force_mae"] == pytest.approx(record["metrics"]["final"]["test/force_mae"], rel=1e-4)


@pytest.mark.slow
def test_ddp_parity_mae_covers_every_rank(tmp_path):
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("matsciml")),
            "fit",
            "--config",
            "configs/devset/s2ef-egnn.yaml",
            *QUICK,
            "--trainer.limit_val_batches=3",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    final = load_record(run_dir / "step.json")["metrics"]["final"]  # logged with sync_dist over both ranks
    shown = plots.read_numbers(run_dir / "parity_val.png")
    assert shown["energy_mae"] == pytest.approx(final["val/energy_mae"], rel=1e-4)
    assert shown["force_mae"] == pytest.approx(final["val/force_mae"], rel=1e-4)


def test_runs_plot_overlays_runs(s2ef_run, is2re_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["runs", "plot", str(s2ef_run), str(is2re_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_picture(out)
    shown = plots.read_numbers(out)  # both runs are drawn, named by their paths (both are version_0)
    assert shown.keys() == {
        f"{run.parent.parent.name}/lightning_logs/version_0 val/energy_mae" for run in (s2ef_run, is2re_run)
    }
    assert main(["runs", "plot", str(s2ef_run), "--metric", "val/nonsense", "--out", str(out)]) == 2
    assert "no run logged val/nonsense" in capsys.readouterr().err


def test_parity_mae_uses_every_point_but_draws_a_sample(tmp_path):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(30_000, 3))
    predicted = reference + 0.1
    figure, shown = plots.parity_figure(
        (reference[:, 0], reference[:, 0] + 1.0), (predicted, reference), max_points=1_000
    )
    assert shown == pytest.approx({"energy_mae": 1.0, "force_mae": 0.1})
    assert figure.axes[1].collections[0].get_offsets().shape == (1_000, 2)
    path = plots.save_png(figure, tmp_path / "parity.png", shown)
    assert plots.read_numbers(path) == pytest.approx(shown)
    assert [p.name for p in tmp_path.iterdir()] == ["parity.png"]


def test_epoch_table_joins_train_and_val_rows():
    history = pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1],
            "step": [1, 1, 3, 3],
            "train/loss_epoch": [np.nan, 2.0, np.nan, 1.0],
            "val/loss": [3.0, np.nan, 2.5, np.nan],
        }
    )
    table = plots.epoch_table(history)
    assert table["train/loss_epoch"].tolist() == [2.0, 1.0] and table["val/loss"].tolist() == [3.0, 2.5]
