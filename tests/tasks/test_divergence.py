"""The divergence guard: a non-finite step stops ``matsciml fit`` there, keeps the finite checkpoints, says why."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from distributed.test_ddp import base_env

from matsciml.cli.app import main
from matsciml.cli.training import run
from matsciml.records import plots
from matsciml.records.provenance import load_record
from matsciml.tasks.divergence import SKIPPED_METRIC, DivergenceGuard, TrainingDiverged, first_nonfinite

ROOT = Path(__file__).resolve().parents[2]
#: 4 training steps per epoch on the S2EF devset (batch size 4)
QUICK = [
    "--config",
    "configs/devset/s2ef-egnn.yaml",
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def poison(steps, **more) -> str:
    spec = {"class_path": "helpers.interrupts.NonFiniteAtStep", "init_args": {"steps": steps, **more}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def fit(tmp_path: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``matsciml fit`` of this checkout in its own process, the test helpers importable."""
    env = base_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    command = [str(Path(sys.executable).with_name("matsciml")), "fit", *extra]
    command.append(f"--trainer.logger.init_args.save_dir={tmp_path}")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert first_nonfinite(saved["state_dict"]) is None and first_nonfinite(saved["optimizer_states"]) is None
    return saved


def the_record(save_dir: Path) -> dict:
    (path,) = save_dir.rglob("step.json")
    return load_record(path)


class WeightProbe(pl.Callback):
    """Keeps a copy of the weights before and after every training step."""

    def __init__(self):
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def _copy(pl_module) -> dict:
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.module, self.trainer = pl_module, trainer
        self.before[trainer.global_step] = self._copy(pl_module)
        self.ema_before = self._ema(trainer)

    @staticmethod
    def _ema(trainer) -> dict | None:
        """The EMA average's weights, if the task keeps one."""
        average = next((c._average_model for c in trainer.callbacks if getattr(c, "_average_model", None)), None)
        return None if average is None else {k: v.detach().clone() for k, v in average.module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step - 1] = self._copy(pl_module)


def test_a_nan_batch_stops_fit_at_that_step_with_one_line(tmp_path):
    done = fit(tmp_path, *QUICK, poison(6))  # epoch 1, its third batch
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("matsciml: error: training diverged at epoch 1, step 6: non-finite loss (nan)"), line
    assert "on structures sid/fid " in line and "last finite loss " in line and "at step 5" in line
    record = the_record(tmp_path)
    assert record["status"] == "FAILED" and record["error"]["type"] == "TrainingDiverged"
    assert record["error"]["message"] == line.removeprefix("matsciml: error: ")
    folder = next(tmp_path.rglob("checkpoints"))
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    for name in ("last.ckpt", "best.ckpt"):  # finite, from the end of epoch 0 (before step 6)
        assert checkpoint(folder / name)["global_step"] == 4


def test_the_stopped_step_leaves_weights_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    probe = WeightProbe()
    args = ["fit", *QUICK, "--model.init_args.ema_decay=0.9", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(TrainingDiverged, match="training diverged at epoch 0, step 2: non-finite loss"):
        run([*args, poison(2)], extra_callbacks=[probe])
    assert 2 in probe.before and 2 not in probe.after  # it stopped inside step 2
    for name, value in probe.module.state_dict().items():  # with step 1's weights, step 2 not applied
        assert torch.equal(value, probe.before[2][name]), name
    assert first_nonfinite(probe.before[2]) is None
    ema_after = probe._ema(probe.trainer)  # the average too, and the optimiser state
    assert ema_after is not None and first_nonfinite(ema_after) is None
    assert all(torch.equal(ema_after[k], probe.ema_before[k]) for k in ema_after)
    assert first_nonfinite(probe.trainer.optimizers[0].state_dict()["state"]) is None


def test_skip_mode_skips_counts_and_records(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    probe = WeightProbe()
    args = ["fit", *QUICK, "--trainer.max_epochs=2", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    run([*args, "--divergence_guard.skip_nonfinite_batches=2", poison([1, 5])], extra_callbacks=[probe])
    for step in (1, 5):  # no optimiser step: the weights after equal those before
        for name, before in probe.before[step].items():
            assert torch.equal(before, probe.after[step][name]), (step, name)
    assert not torch.equal(probe.before[2]["model.embedding.weight"], probe.after[2]["model.embedding.weight"])
    record = the_record(tmp_path)
    assert record["status"] == "COMPLETED"
    assert record["metrics"]["final"][SKIPPED_METRIC] == 2
    history = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    assert history[SKIPPED_METRIC].dropna().tolist() == [1.0, 2.0]  # per epoch: the count so far
    checkpoint(next(tmp_path.rglob("last.ckpt")))


def test_the_batch_after_the_allowed_skips_stops_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = ["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main([*args, "--divergence_guard.skip_nonfinite_batches=1", poison([1, 3])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("matsciml: error: training diverged at epoch 0, step 3") and "after skipping 1 batches" in err
    assert the_record(tmp_path)["status"] == "FAILED"


class InfWeightAtStep(pl.Callback):
    """Sets one weight to inf after optimiser step ``step``: weights gone bad between checks."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("inf")


def test_a_non_finite_checkpoint_is_never_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(
        TrainingDiverged,
        match=r"diverged by epoch 1, step 8: state_dict \S+ holds NaN or inf, so this checkpoint is not written",
    ):
        run(args, extra_callbacks=[InfWeightAtStep(8)])  # the last step of epoch 1: its checkpoint would hold inf
    folder = next(tmp_path.rglob("checkpoints"))
    assert checkpoint(folder / "last.ckpt")["global_step"] == 4
    assert checkpoint(folder / "best.ckpt")["global_step"] == 4


class NaNValidationAtEpoch(pl.Callback):
    """Turns the validation positions into NaN from epoch ``epoch`` on: a NaN monitored metric."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_batch_start(self, trainer, pl_module, batch, *args) -> None:
        if trainer.current_epoch >= self.epoch and not trainer.sanity_checking:
            batch["positions"].fill_(float("nan"))


def test_a_nan_validation_metric_keeps_the_finite_best(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run(["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"], extra_callbacks=[NaNValidationAtEpoch(1)])
    folder = next(tmp_path.rglob("checkpoints"))
    assert checkpoint(folder / "best.ckpt")["global_step"] == 4  # epoch 0's, its monitor finite
    assert checkpoint(folder / "last.ckpt")["global_step"] == 12  # the weights stay finite
    assert (folder.parent / "parity_val.png").is_file()  # drawn from NaN predictions
    record = the_record(tmp_path)
    assert record["status"] == "COMPLETED" and record["metrics"]["final"]["val/force_mae"] is None


#: the issue's learning rate: the devset EGNN's loss reaches 1e15-1e17 within 10 steps and a gradient's square
#: overflows float32. Without the guard (limit_train_batches=4) the run trained on to NaN weights in last.ckpt at
#: step 28, inf in best.ckpt's Adam state, and died in the parity plot
DIVERGING_LR = 0.4


@pytest.mark.slow
def test_a_too_large_learning_rate_stops_cleanly(tmp_path):
    """The issue's run (``--model.init_args.lr=0.4``), short: it stops at the first bad step, checkpoints finite."""
    epochs = ["--trainer.max_epochs=8", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]
    config = ["--config", "configs/devset/s2ef-egnn.yaml", "--trainer.enable_progress_bar=false", *epochs]
    done = fit(tmp_path, *config, f"--model.init_args.lr={DIVERGING_LR}", timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    stopped = re.match(r"matsciml: error: training diverged at epoch \d+, step (\d+): ", line)
    assert stopped, line
    assert the_record(tmp_path)["status"] == "FAILED"
    saved = [checkpoint(path)["global_step"] for path in tmp_path.rglob("*.ckpt")]  # weights and Adam state finite
    assert saved and max(saved) < int(stopped.group(1))


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_one_rank_diverges(tmp_path):
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    done = fit(tmp_path, *QUICK, *ddp, poison(2, rank=1))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("matsciml: error: ")]
    assert len(errors) == 2, errors  # one per rank, each naming its own batch
    assert any("step 2: non-finite loss (nan); rank 1 had structures sid/fid" in line for line in errors), errors
    assert any("step 2: non-finite loss on 1 other rank(s); rank 0 had structures" in line for line in errors)
    record = the_record(tmp_path)  # rank 0's
    assert record["status"] == "FAILED" and "other rank(s); rank 0 had" in record["error"]["message"]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_plots_draw_non_finite_values(tmp_path):
    energy = (np.array([1.0, np.nan, 2.0, np.inf]), np.array([1.0, 2.0, 3.0, 4.0]))
    forces = (np.array([[np.nan, 0.0, 1.0]]), np.array([[0.0, 0.0, 1.0]]))
    figure, shown = plots.parity_figure(energy, forces)
    assert np.isnan(shown["energy_mae"]) and np.isnan(shown["force_mae"])
    plots.save_png(figure, tmp_path / "parity.png", shown)
    figure, _ = plots.parity_figure((np.full(3, np.nan), np.ones(3)))  # nothing finite to draw
    plots.save_png(figure, tmp_path / "empty.png")
    history = pd.DataFrame(
        {
            "epoch": [0, 0, 1, 1, 2],
            "step": [3, 3, 7, 7, 9],
            "train/loss_epoch": [1.0, None, np.inf, None, np.nan],
            "val/loss": [None, 0.5, None, np.nan, None],
        }
    )
    figure, final = plots.learning_curve_figure(history)
    plots.save_png(figure, tmp_path / "curve.png", final)
    assert (tmp_path / "parity.png").is_file() and (tmp_path / "curve.png").is_file()


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="skip_nonfinite_batches must be >= 0"):
        DivergenceGuard(-1)
    with pytest.raises(TypeError, match="skip_nonfinite_batches must be an integer"):
        DivergenceGuard(1.5)
    assert first_nonfinite({"a": torch.ones(2), "b": [torch.tensor([1.0, float("nan")])]}) == "b[0]"
    assert first_nonfinite({"a": torch.ones(2), "n": torch.tensor([1])}) is None


def guard_step(guard: DivergenceGuard, grad: float, **trainer) -> None:
    """One ``on_before_optimizer_step`` of a parameter whose gradient is ``grad``, finite loss 1."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.full((3,), grad)
    settings = dict(world_size=1, global_rank=0, global_step=7, current_epoch=0, gradient_clip_val=None)
    fake = SimpleNamespace(precision_plugin=None, accumulate_grad_batches=1, **{**settings, **trainer})
    module = SimpleNamespace(device=torch.device("cpu"))
    guard.on_train_batch_start(fake, module, {"sid": torch.tensor([3]), "fid": torch.tensor([1])}, 0)
    guard.on_before_backward(fake, module, torch.tensor(1.0))
    guard.on_before_optimizer_step(fake, module, torch.optim.Adam([parameter]))


def test_a_gradient_whose_square_overflows_stops_unless_clipped():
    guard_step(DivergenceGuard(), 1e18)  # its square fits float32
    with pytest.raises(TrainingDiverged, match=r"step 7: non-finite gradients, or gradients whose square overflows"):
        guard_step(DivergenceGuard(), 1e20)  # Adam's exp_avg_sq would be inf
    guard_step(DivergenceGuard(), 1e20, gradient_clip_val=1.0)  # Lightning clips it after the check
    with pytest.raises(TrainingDiverged, match="on structures sid/fid 3/1"):
        guard_step(DivergenceGuard(), float("nan"), gradient_clip_val=1.0)  # clipping cannot mend NaN
