"""IS2RE task: L1 on relaxed energy, a per-structure normaliser, metrics in eV."""

import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data.datamodules import IS2REDataModule
from matsciml.tasks import IS2RELitModule, IS2RETask


@pytest.fixture(scope="module")
def datamodule():
    dm = IS2REDataModule.from_devset(batch_size=8, shuffle=False)
    dm.setup("fit")
    return dm


def test_paper_name_is_an_alias():
    assert IS2RELitModule is IS2RETask


def test_normaliser_shifts_per_structure_by_the_mean_relaxed_energy(datamodule):
    stats = datamodule.target_statistics["relaxed_energy"]
    model = tiny_egnn()
    torch.nn.init.zeros_(model.output[-1].weight)
    torch.nn.init.zeros_(model.output[-1].bias)
    task = IS2RETask(model, statistics=datamodule.target_statistics).eval()
    batch = next(iter(datamodule.val_dataloader()))
    energy = task(batch)["energy"]
    assert torch.allclose(energy.double(), torch.full_like(energy, stats["mean"]).double(), atol=1e-6)
    assert float(task.normalizer.scale) == pytest.approx(stats["std"])
    assert "forces" not in task(batch)


def test_metrics_are_l1_in_ev_and_training_lowers_the_loss(datamodule):
    torch.manual_seed(0)
    task = IS2RETask(tiny_egnn(), lr=3e-3, statistics=datamodule.target_statistics)
    batch = next(iter(datamodule.train_dataloader()))
    task.eval()
    loss, metrics = task.step(batch)
    error = (task.energy(batch) - batch.relaxed_energy).abs()
    assert torch.allclose(metrics["energy_mae"][0], error.mean())
    assert torch.allclose(loss, error.mean() / task.normalizer.scale.float())
    trainer = quiet_trainer(max_epochs=4, limit_val_batches=0)

    def training_loss():  # over the whole split: an untrained model already predicts the mean
        task.eval()
        with torch.no_grad():
            return sum(float(task.step(b)[0]) for b in datamodule.train_dataloader())

    before = training_loss()
    task.train()
    trainer.fit(task, datamodule=datamodule)
    assert training_loss() < before


def test_trains_on_cpu_in_bf16_mixed_precision(datamodule):
    task = IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, precision="bf16-mixed")
    trainer.fit(task, datamodule=datamodule)
    metrics = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert 0 < metrics["val/energy_mae"] < 10  # eV: the bf16 model output is scaled back in float32


def test_fitted_element_references_are_refused_for_adsorption_energies(datamodule):
    with pytest.raises(ValueError, match="adsorption energy"):
        IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics, element_references="fit")
