"""The training recipe: EMA weights, ReduceLROnPlateau, Huber loss, the best checkpoint (real Lightning runs)."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn
from lightning.pytorch.callbacks import ModelCheckpoint

from matsciml.artifacts.export import load_model, read_checkpoint
from matsciml.cli.app import main
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.tasks import IS2RETask, S2EFTask
from matsciml.tasks.best_checkpoint import BestCheckpoint
from matsciml.tasks.ema import EMAWeightAveraging

DECAY = 0.5  # a short memory, so a few steps leave the average far from the raw weights


class StepWeights(pl.Callback):
    """The raw parameters after every optimiser step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


class ValidationMetric(pl.Callback):
    def __init__(self, name: str):
        self.name, self.values = name, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics[self.name]))


def _fit(folder: Path, max_epochs: int, ckpt_path=None, callbacks=(), **task_kwargs) -> S2EFTask:
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), **{"lr": 3e-3, **task_kwargs})
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True), *callbacks],
    )
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4, shuffle=False), ckpt_path=ckpt_path)
    return task


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run writes to its own folder
def test_checkpoints_hold_the_ema_of_the_weights_and_resuming_keeps_it(tmp_path):
    recorder = StepWeights()
    _fit(tmp_path / "a", max_epochs=2, callbacks=[recorder], ema_decay=DECAY)
    ema = dict(recorder.steps[0])  # the first update copies
    for n, weights in enumerate(recorder.steps[1:], start=1):
        decay = min(DECAY, (1 + n) / (10 + n))  # the warm-up
        ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    saved = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert len(recorder.steps) == 6
    for name, value in ema.items():
        torch.testing.assert_close(saved["state_dict"][name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["current_model_state"][name], recorder.steps[-1][name])
    name = "model.readout.0.weight" if "model.readout.0.weight" in ema else next(iter(ema))
    assert not torch.allclose(saved["state_dict"][name], saved["current_model_state"][name])
    # the normaliser's buffers are the task's, not averaged (the averaged copy predates their fit)
    assert bool(saved["state_dict"]["fitted"]) and bool(saved["state_dict"]["normalizer.per_atom"])
    for buffer in ("normalizer.shift", "normalizer.scale", "normalizer.references", "mean_energy"):
        assert torch.equal(saved["state_dict"][buffer], saved["current_model_state"][buffer])

    # one epoch, then a resumed second: the same average and raw weights as two epochs at once
    _fit(tmp_path / "b", max_epochs=1, ema_decay=DECAY)
    _fit(tmp_path / "c", max_epochs=2, ckpt_path=tmp_path / "b" / "checkpoints" / "last.ckpt", ema_decay=DECAY)
    resumed = read_checkpoint(tmp_path / "c" / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "current_model_state"):
        for name, value in saved[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-5, atol=1e-6)


def test_ema_warm_up_keeps_a_short_run_from_averaging_in_the_initial_weights(tmp_path):
    """At decay 0.999 without warm-up, 6 steps leave 99.5 % of the random initial weights in the
    average; with it the first updates weigh the new weights most, as nequip's EMA does."""
    recorder = StepWeights()
    _fit(tmp_path, max_epochs=2, callbacks=[recorder], ema_decay=0.999)
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    first, last = recorder.steps[0], recorder.steps[-1]
    for name in first:
        moved = (last[name] - first[name]).norm()
        if moved > 0:  # the average has followed most of the way from the first weights to the last
            assert (saved[name] - last[name]).norm() < 0.6 * moved, name


class NormaliserSeen(pl.Callback):
    """(sanity check?, fitted, scale) of the normaliser the task validates with."""

    def __init__(self):
        self.rows = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.rows.append((trainer.sanity_checking, bool(pl_module.fitted), float(pl_module.normalizer.scale)))


def test_validation_under_ema_uses_the_fitted_normaliser_from_the_sanity_check_on():
    # Lightning builds the averaged copy before the task fits its normaliser; swapping its buffers in
    # would validate the sanity check with shift 0, scale 1 (Lightning's own callback does)
    torch.manual_seed(0)
    seen = NormaliserSeen()
    trainer = quiet_trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=1, callbacks=[seen]
    )
    task = S2EFTask(tiny_egnn(), ema_decay=DECAY)
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4, shuffle=False))
    scale = float(task.normalizer.scale)
    assert scale != 1.0
    assert seen.rows == [(True, True, scale), (False, True, scale)]


def test_the_calculator_uses_the_averaged_weights(tmp_path):
    task = _fit(tmp_path, max_epochs=1, ema_decay=DECAY)  # ends training holding the average
    loaded = load_task(tmp_path / "checkpoints" / "last.ckpt")
    for name, value in task.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_ema_decay_is_checked():
    with pytest.raises(ValueError, match="ema_decay"):
        S2EFTask(tiny_egnn(), ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        EMAWeightAveraging(decay=-0.1)


def test_plateau_scheduler_reduces_the_lr_when_the_monitored_metric_stalls():
    # an lr this small cannot move val/force_mae by ReduceLROnPlateau's relative threshold (1e-4)
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), lr=1e-12, scheduler="plateau", plateau_patience=0, plateau_factor=0.5)
    assert task.monitor == "val/force_mae"
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4, shuffle=False))
    scheduler = trainer.lr_scheduler_configs[0]
    assert isinstance(scheduler.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert scheduler.monitor == "val/force_mae"
    # epoch 1 sets the best, epochs 2 and 3 do not improve: halved twice
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25e-12)


def test_the_monitor_defaults_per_task_and_must_be_logged():
    assert IS2RETask(tiny_egnn()).monitor == "val/energy_mae"
    assert S2EFTask(tiny_egnn(), regress_forces=False).monitor == "val/energy_mae"
    assert S2EFTask(tiny_egnn(), monitor="val/energy_per_atom_mae").monitor == "val/energy_per_atom_mae"
    with pytest.raises(ValueError, match="val/force_mae.*not a metric this task logs"):
        IS2RETask(tiny_egnn(), monitor="val/force_mae")
    with pytest.raises(ValueError, match="scheduler"):
        S2EFTask(tiny_egnn(), scheduler="cosine")


def test_huber_loss_is_quadratic_below_delta_and_linear_above():
    task = S2EFTask(tiny_egnn(), loss="huber", huber_delta=0.5)
    prediction, target = torch.tensor([0.0, 0.0]), torch.tensor([0.2, 2.0])
    expected = (0.5 * 0.2**2 + 0.5 * (2.0 - 0.5 * 0.5)) / 2
    assert float(task.loss_fn(prediction, target)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="huber_delta"):
        S2EFTask(tiny_egnn(), loss="huber", huber_delta=0.0)


def test_is2re_trains_with_huber_and_plateau():
    torch.manual_seed(0)
    task = IS2RETask(tiny_egnn(), loss="huber", scheduler="plateau")
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule=IS2REDataModule.from_devset(batch_size=4, shuffle=False))
    assert torch.isfinite(trainer.callback_metrics["val/energy_mae"])


def test_best_checkpoint_is_the_lowest_validation_and_loads_from_the_run_folder(tmp_path, capsys):
    metric = ValidationMetric("val/force_mae")
    _fit(tmp_path, max_epochs=4, callbacks=[BestCheckpoint(dirpath=str(tmp_path / "checkpoints")), metric], lr=0.05)
    best = read_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert len(metric.values) == 4
    assert best["epoch"] == min(range(4), key=metric.values.__getitem__)
    assert best["callbacks"]  # the monitored metric resolved from the task
    assert any("val/force_mae" in key for key in best["callbacks"])
    # the calculator and load_task take a run folder and which checkpoint
    for which in ("best", "last"):
        task = load_task(tmp_path, which=which)
        file = read_checkpoint(tmp_path / "checkpoints" / f"{which}.ckpt")
        for name, value in file["state_dict"].items():
            torch.testing.assert_close(task.state_dict()[name], value)
    calculator = MatSciMLCalculator.from_checkpoint(tmp_path, which="best")
    for name, value in best["state_dict"].items():
        torch.testing.assert_close(calculator.task.state_dict()[name], value, check_dtype=False)  # float32 copy
    # matsciml export RUN --which best
    out = tmp_path / "best.msml"
    assert main(["export", str(tmp_path), "--which", "best", "--out", str(out)]) == 0
    exported = load_model(out)
    for name, value in best["state_dict"].items():
        torch.testing.assert_close(exported.state_dict()[name], value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.ckpt"):
        load_task(tmp_path / "empty", which="best")
    with pytest.raises(ValueError, match="run folder"):
        load_task(tmp_path / "checkpoints" / "best.ckpt", which="last")


@pytest.mark.parametrize("energy_loss", ["per_atom", "total"])
def test_the_energy_loss_is_per_atom_unless_asked_for_totals(energy_loss):
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), regress_forces=False, energy_loss=energy_loss, statistics=datamodule.target_statistics)
    with torch.no_grad():
        loss, _ = task.step(batch)
        energy = task(batch)["energy"]
    per = batch.natoms.to(energy.dtype) if energy_loss == "per_atom" else 1.0
    scale = task.energy_scale.to(energy.dtype)
    expected = (energy / per / scale - batch.energy.to(energy.dtype) / per / scale).abs().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="energy_loss"):
        S2EFTask(tiny_egnn(), energy_loss="per_structure")
