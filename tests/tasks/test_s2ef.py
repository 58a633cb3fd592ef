"""S2EF task: autograd forces everywhere, masked losses, metrics in eV, one backward, checkpoints."""

import warnings

import numpy as np
import pytest
import torch
from helpers.physics import small_bulk
from helpers.training import quiet_trainer, tiny_egnn, tiny_megnet
from lightning.pytorch import seed_everything

from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.formats.card import stale_statistics
from matsciml.data.structures import batch_from_atoms
from matsciml.models import EGNN, MegNet
from matsciml.tasks import S2EFLitModule, S2EFTask


@pytest.fixture(scope="module")
def datamodule():
    dm = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    dm.setup("fit")
    return dm


@pytest.fixture
def task(datamodule):
    torch.manual_seed(0)
    return S2EFTask(tiny_egnn(), statistics=datamodule.target_statistics)


def first_batch(datamodule, split="val"):
    return next(iter(datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()))


def manual_forces(task, batch):
    positions = batch.positions.clone().requires_grad_(True)
    energy = task.energy(batch.replace(positions=positions))
    return -torch.autograd.grad(energy.sum(), positions)[0]


def test_paper_name_is_an_alias():
    assert S2EFLitModule is S2EFTask


def test_forces_are_minus_energy_gradient_in_train_and_eval(task, datamodule):
    batch = first_batch(datamodule)
    expected = manual_forces(task, batch)
    task.train()
    train_forces = task(batch)["forces"]
    assert train_forces.requires_grad  # create_graph: the force loss reaches the weights
    assert torch.allclose(train_forces, expected, atol=1e-6)
    task.eval()
    with torch.inference_mode():  # what Lightning wraps validation, test and predict in
        inference_batch = first_batch(datamodule)
        out = task(inference_batch)
    assert torch.allclose(out["forces"], expected, atol=1e-6)


def test_validate_and_predict_under_lightning_inference_mode_give_autograd_forces(task, datamodule):
    trainer = quiet_trainer(limit_val_batches=2, limit_predict_batches=2)
    metrics = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert metrics["val/force_mae"] > 0 and np.isfinite(metrics["val/force_mae"])
    predictions = trainer.predict(task, dataloaders=datamodule.predict_dataloader())
    batch = next(iter(datamodule.predict_dataloader()))
    task.eval()
    expected = manual_forces(task, batch).split(batch.natoms.tolist())
    first = predictions[0]
    assert torch.equal(first["sid"], batch.sid) and torch.equal(first["fid"], batch.fid)
    assert first["energy"].shape == (batch.num_structures,)
    for predicted, reference in zip(first["forces"], expected, strict=True):
        assert torch.allclose(predicted, reference, atol=1e-6)


def test_force_loss_and_metrics_ignore_fixed_atoms(task, datamodule):
    batch = first_batch(datamodule)
    assert batch.fixed.any() and (~batch.fixed).any()
    noisy = batch.forces.clone()
    noisy[batch.fixed] += 100.0
    task.eval()
    loss, metrics = task.step(batch)
    loss_noisy, metrics_noisy = task.step(batch.replace(forces=noisy))
    assert torch.allclose(loss, loss_noisy)
    assert torch.allclose(metrics["force_mae"][0], metrics_noisy["force_mae"][0])
    assert metrics["force_mae"][1] == 3 * int((~batch.fixed).sum())


def test_metrics_are_in_ev_not_normalised_units(task, datamodule):
    batch = first_batch(datamodule)
    task.eval()
    _, metrics = task.step(batch)
    out = task(batch)
    free = ~batch.fixed
    energy_mae = (out["energy"] - batch.energy).abs().mean()
    force_mae = (out["forces"][free] - batch.forces[free]).abs().mean()
    assert torch.allclose(metrics["energy_mae"][0], energy_mae)
    per_atom = ((out["energy"] - batch.energy).abs() / batch.natoms).mean()
    assert torch.allclose(metrics["energy_per_atom_mae"][0], per_atom)
    assert torch.allclose(metrics["force_mae"][0], force_mae)
    assert torch.allclose(metrics["energy_mae_baseline"][0], (batch.energy - task.mean_energy.float()).abs().mean())
    assert float(task.normalizer.scale) != 1.0  # the normaliser is active, so the check means something


def test_untrained_model_predicts_the_training_mean_per_atom(datamodule):
    stats = datamodule.target_statistics
    model = tiny_egnn()
    torch.nn.init.zeros_(model.output[-1].weight)
    torch.nn.init.zeros_(model.output[-1].bias)
    task = S2EFTask(model, statistics=stats).eval()
    batch = first_batch(datamodule)
    expected = stats["energy_per_atom"]["mean"] * batch.natoms.double()
    assert torch.allclose(task(batch)["energy"].double(), expected, rtol=1e-5)


def test_one_backward_per_training_step(task, datamodule):
    calls = []
    parameter = next(task.model.parameters())
    parameter.register_hook(lambda grad: calls.append(1))
    quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0).fit(task, datamodule=datamodule)
    assert len(calls) == 3


def test_scheduler_steps_once_per_epoch(datamodule):
    task = S2EFTask(tiny_egnn(), lr=1e-3, gamma=0.5, statistics=datamodule.target_statistics)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(task, datamodule=datamodule)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)


def test_normalisers_are_fitted_in_setup_and_restored_from_the_checkpoint(datamodule, tmp_path):
    task = S2EFTask(tiny_egnn())  # no statistics given: setup() takes them from the datamodule
    assert not bool(task.fitted)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=datamodule)
    stats = datamodule.target_statistics
    assert float(task.normalizer.scale) == pytest.approx(stats["forces"]["components"]["std"])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = S2EFTask.load_from_checkpoint(path, weights_only=True)  # plain data: no code runs
    assert bool(restored.fitted)
    for name, buffer in task.normalizer.named_buffers():
        assert torch.equal(buffer, getattr(restored.normalizer, name))
    batch = first_batch(datamodule)
    task.eval()
    restored.eval()
    assert torch.allclose(task(batch)["energy"], restored(batch)["energy"])


def test_stress_is_the_strain_derivative_over_volume():
    atoms = small_bulk()
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(cutoff=5.0), regress_stress=True).double().eval()
    batch = batch_from_atoms([atoms], cutoff=5.0, max_neighbors=None, dtype=torch.float64)
    stress = task(batch)["stress"][0]
    volume = atoms.get_volume()
    step = 1e-6
    numeric = torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = torch.zeros(3, 3, dtype=torch.float64)
                strain[a, b] += sign * step / 2
                strain[b, a] += sign * step / 2
                deform = torch.eye(3, dtype=torch.float64) + strain
                strained = batch.replace(positions=batch.positions @ deform, cell=batch.cell @ deform)
                energies.append(task.energy(strained).sum())
            numeric[a, b] = (energies[0] - energies[1]) / (2 * step) / volume
    assert torch.allclose(stress, numeric, atol=1e-7)
    assert torch.allclose(stress, stress.T, atol=1e-12)


def test_setup_refuses_mismatched_data(datamodule):
    point_clouds = S2EFDataModule.from_devset(batch_size=2, representation="point_cloud")
    with pytest.raises(ValueError, match="representation"):
        quiet_trainer(max_steps=1).fit(S2EFTask(tiny_egnn()), datamodule=point_clouds)
    short = S2EFDataModule.from_devset(batch_size=2, cutoff=4.0)
    with pytest.raises(ValueError, match="shorter than the model's cutoff"):
        quiet_trainer(max_steps=1).fit(S2EFTask(tiny_egnn(cutoff=6.0)), datamodule=short)
    with pytest.raises(ValueError, match="embeds only"):
        S2EFTask(tiny_egnn(num_species=20), species=[1, 8, 29])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr must be positive"):
        S2EFTask(tiny_egnn(), lr=0)
    with pytest.raises(ValueError, match="gamma"):
        S2EFTask(tiny_egnn(), gamma=1.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        S2EFTask(tiny_egnn(), loss="log_cosh")
    with pytest.raises(TypeError, match="AbstractEnergyModel"):
        S2EFTask(torch.nn.Linear(2, 2))


def test_model_rebuilds_from_its_spec_in_hparams():
    task = S2EFTask(tiny_egnn(hidden=12))
    rebuilt = S2EFTask(**{k: v for k, v in task.hparams.items()})
    assert rebuilt.model.spec() == task.model.spec()
    assert task.hparams["model"]["class_path"] == "matsciml.models.egnn.EGNN"


@pytest.mark.parametrize("name", ["egnn", "megnet", "gala"])
def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search(name):
    # lazily built or unused heads force DDP's find_unused_parameters=True (REFERENCE.md §3)
    from helpers.physics import slab, small_bulk

    from matsciml.models import Gala

    models = {
        "egnn": lambda: tiny_egnn(),
        "megnet": tiny_megnet,
        "gala": lambda: Gala(hidden=8, num_blocks=1),
    }
    model = models[name]()
    representation = model.representation
    batch = batch_from_atoms([slab(), small_bulk()], cutoff=6.0, representation=representation)
    batch = batch.replace(energy=torch.tensor([1.0, 2.0]), forces=torch.randn(batch.num_atoms, 3))
    task = S2EFTask(model).train()
    loss, _ = task.step(batch)
    loss.backward()
    assert not any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in task.parameters())
    missing = [n for n, p in task.named_parameters() if p.grad is None]
    assert not missing


def test_forces_stay_float32_under_bf16_autocast(task, datamodule):
    batch = first_batch(datamodule)
    task.eval()
    reference = task(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = task(batch)
    assert mixed["forces"].dtype == torch.float32 and mixed["energy"].dtype == torch.float32
    assert torch.allclose(mixed["forces"], reference["forces"], atol=1e-6)
    assert torch.allclose(mixed["energy"], reference["energy"], atol=1e-5)


@pytest.mark.parametrize(("precision", "model"), [("bf16-mixed", "egnn"), ("32", "egnn"), ("bf16-mixed", "megnet")])
def test_trains_on_cpu_at_each_precision(datamodule, precision, model):
    # MegNet's Set2Set LSTM runs in float32 under CPU autocast (oneDNN lacks a bf16 LSTM on many CPUs)
    model = (
        tiny_egnn()
        if model == "egnn"
        else MegNet(
            cutoff=6.0,
            num_blocks=1,
            dense_sizes=(16, 8),
            conv_sizes=(16, 16, 8),
            num_gaussians=16,
            set2set_layers=1,
            set2set_steps=2,
            output_sizes=(8, 4),
        )
    )
    task = S2EFTask(model, statistics=datamodule.target_statistics)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, precision=precision)
    trainer.fit(task, datamodule=datamodule)
    metrics = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert np.isfinite(metrics["val/force_mae"]) and metrics["val/force_mae"] > 0


# -- element references, honest statistics, stress only with a cell --------------------------------
def _training_fit(datamodule):
    """Per-atom least-squares composition fit of the training energies, from the raw records."""
    dataset = datamodule.datasets["train"]
    records = [dataset.read(i) for i in range(len(dataset))]
    numbers = sorted({int(z) for r in records for z in r["atomic_numbers"]})
    counts = np.array([[np.sum(r["atomic_numbers"] == z) for z in numbers] for r in records], dtype=float)
    natoms = counts.sum(axis=1)
    energy = np.array([float(r["energy"]) for r in records])
    solution = np.linalg.lstsq(counts / natoms[:, None], energy / natoms, rcond=None)[0]
    return dict(zip(numbers, solution.tolist(), strict=True)), counts @ solution, energy


def _zero_output(model):
    torch.nn.init.zeros_(model.output[-1].weight)
    torch.nn.init.zeros_(model.output[-1].bias)
    return model


def _train_energies(task, datamodule):
    task.eval()
    return torch.cat([task(b)["energy"].detach().double() for b in datamodule.train_dataloader()]).numpy()


def test_fresh_task_with_fitted_references_predicts_the_least_squares_fit(datamodule):
    _, fit, energy = _training_fit(datamodule)
    torch.manual_seed(0)
    exact = S2EFTask(_zero_output(tiny_egnn()), statistics=datamodule.target_statistics, element_references="fit")
    np.testing.assert_allclose(_train_energies(exact, datamodule), fit, rtol=1e-5)
    torch.manual_seed(0)
    fresh = S2EFTask(EGNN(cutoff=6.0), statistics=datamodule.target_statistics, element_references="fit")
    deviation = np.abs(_train_energies(fresh, datamodule) - fit).mean()
    assert deviation < 0.2 * np.abs(energy - fit).mean()  # the untrained output is near zero


def test_given_references_are_subtracted_before_the_statistics(datamodule):
    references, fit, _ = _training_fit(datamodule)
    given = S2EFTask(
        _zero_output(tiny_egnn()), statistics=datamodule.target_statistics, element_references=references
    )  # the old code added these to the raw mean too
    np.testing.assert_allclose(_train_energies(given, datamodule), fit, rtol=1e-5)


def test_first_epoch_energy_error_is_at_most_the_mean_baseline(datamodule):
    """A real Lightning epoch of the devset config's EGNN: the energy MAE must not exceed the mean's."""
    seed_everything(0)
    shuffled = S2EFDataModule.from_devset(batch_size=4)
    task = S2EFTask(EGNN(cutoff=6.0), lr=0.003, gamma=0.95, element_references="fit")
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(task, datamodule=shuffled)
    assert trainer.global_step == len(shuffled.train_dataloader()) == 50
    metrics = trainer.callback_metrics
    assert float(metrics["val/energy_mae"]) <= float(metrics["val/energy_mae_baseline"])


def test_force_statistics_leave_out_fixed_atoms(datamodule):
    card = datamodule.datasets["train"].metadata
    assert stale_statistics(card)  # the shipped card's force statistics include fixed atoms ...
    dataset = datamodule.datasets["train"]
    free = np.concatenate([dataset.read(i)["forces"][~dataset.read(i)["fixed"]] for i in range(len(dataset))])
    stats = datamodule.target_statistics  # ... so the data module recomputes them
    assert stats["forces"]["free_atoms_only"]
    assert stats["forces"]["components"]["std"] == pytest.approx(free.std(), rel=1e-6)
    assert stats["forces"]["components"]["count"] == free.size
    task = S2EFTask(tiny_egnn(), statistics=stats)
    assert float(task.normalizer.scale) == pytest.approx(free.std(), rel=1e-6)


def _bulk_and_molecule():
    from ase import Atoms

    molecule = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    return [small_bulk(), molecule]


def test_stress_task_gives_energy_and_forces_for_a_molecule():
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(cutoff=5.0), regress_stress=True).double()
    batch = batch_from_atoms(_bulk_and_molecule(), cutoff=5.0, max_neighbors=None, dtype=torch.float64)
    out = task.eval()(batch)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    assert torch.isfinite(out["stress"][0]).all() and torch.isnan(out["stress"][1]).all()
    alone = task(batch_from_atoms(_bulk_and_molecule()[1:], cutoff=5.0, max_neighbors=None, dtype=torch.float64))
    assert "stress" not in alone and torch.isfinite(alone["forces"]).all()


def test_stress_loss_masks_structures_without_a_cell_or_labels_and_has_stress_units():
    torch.manual_seed(0)
    task = (
        S2EFTask(tiny_egnn(cutoff=5.0), regress_stress=True, energy_coefficient=0.0, force_coefficient=0.0)
        .double()
        .train()
    )
    structures = _bulk_and_molecule() + [small_bulk()]
    batch = batch_from_atoms(structures, cutoff=5.0, max_neighbors=None, dtype=torch.float64)
    stress = torch.randn(3, 3, 3, dtype=torch.float64) * 0.01
    stress[2] = float("nan")  # no label for the second bulk
    batch = batch.replace(
        energy=torch.zeros(3, dtype=torch.float64), forces=torch.zeros_like(batch.positions), stress=stress
    )
    loss, metrics = task.step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    assert metrics["stress_mae"][1] == 1  # only the labelled bulk
    predicted = task(batch)["stress"][0].detach()
    volume_per_atom = structures[0].get_volume() / len(structures[0])
    stress_scale = float(task.normalizer.scale) / volume_per_atom  # eV/Å^3
    expected = (predicted - stress[0]).abs().mean() / stress_scale
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)


def test_training_without_stress_labels_says_so_once():
    task = S2EFTask(tiny_egnn(cutoff=5.0), regress_stress=True).double().train()
    batch = batch_from_atoms([small_bulk()], cutoff=5.0, max_neighbors=None, dtype=torch.float64)
    batch = batch.replace(energy=torch.zeros(1, dtype=torch.float64), forces=torch.zeros_like(batch.positions))
    with pytest.warns(UserWarning, match="no 'stress' labels"):
        loss, metrics = task.step(batch)
    assert torch.isfinite(loss) and "stress_mae" not in metrics
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not every batch
        task.step(batch)


def test_calculator_on_a_molecule_with_a_stress_trained_task():
    from ase.calculators.calculator import PropertyNotImplementedError

    from matsciml.integrations.calculators import MatSciMLCalculator

    molecule = _bulk_and_molecule()[1]
    molecule.calc = MatSciMLCalculator(S2EFTask(tiny_egnn(), regress_stress=True))
    assert np.isfinite(molecule.get_potential_energy()) and np.isfinite(molecule.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        molecule.get_stress()
