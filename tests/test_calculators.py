"""The ASE calculator: agrees with predict, is a consistent potential, relaxes and runs MD."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.constraints import FixAtoms
from ase.data import chemical_symbols
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from helpers.emt import atoms_from, read_split
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.artifacts.export import export_package
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.data.devsets import devset_path
from matsciml.data.errors import DataError
from matsciml.data.structures import batch_from_atoms
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.tasks import IS2RETask, S2EFTask


def devset_atoms(split: str = "val", count: int = 4) -> list[Atoms]:
    records, _ = read_split(devset_path("s2ef", split))
    structures = []
    for record in records[:count]:
        atoms = atoms_from(record)
        atoms.set_constraint(FixAtoms(mask=record["fixed"].astype(bool)))
        structures.append(atoms)
    return structures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An EGNN trained three epochs on the S2EF devset, saved as a Lightning checkpoint (its last layer
    starts small, so fewer steps leave forces too soft for a tight BFGS convergence)."""
    torch.manual_seed(0)
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    task = S2EFTask(tiny_egnn(), lr=3e-3)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=1)
    trainer.fit(task, datamodule=datamodule)
    path = tmp_path_factory.mktemp("calc") / "s2ef.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_matches_predict_on_the_same_structures(checkpoint):
    task = load_task(checkpoint)
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    with torch.inference_mode():  # as Lightning's predict runs it
        expected = task.predict_step(batch, 0)
    records, _ = read_split(devset_path("s2ef", "test"))
    calc = MatSciMLCalculator.from_checkpoint(checkpoint)
    for i, record in enumerate(records[:4]):
        atoms = atoms_from(record)
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(float(expected["energy"][i]), abs=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), expected["forces"][i].double().numpy(), atol=1e-5)


def test_forces_are_minus_the_energy_gradient(checkpoint):
    atoms = devset_atoms(count=1)[0]
    atoms.set_constraint()
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64", max_neighbors=None)
    forces = atoms.get_forces()
    numerical = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(forces, numerical, atol=1e-7)
    assert np.abs(forces).max() > 1e-3  # not trivially zero


def test_stress_matches_the_strain_derivative_when_trained_with_it():
    torch.manual_seed(1)
    task = S2EFTask(tiny_egnn(), regress_stress=True).eval()
    atoms = devset_atoms(count=1)[0]
    atoms.set_constraint()
    atoms.calc = MatSciMLCalculator(task, dtype="float64", max_neighbors=None)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, eps=1e-5), atol=1e-8)
    assert "stress" not in MatSciMLCalculator(S2EFTask(tiny_egnn())).implemented_properties


def test_molecules_without_a_cell_and_both_precisions(checkpoint):
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    energies = {}
    for dtype in ("float32", "float64"):
        water.calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype=dtype)
        energies[dtype] = water.get_potential_energy()
        assert np.isfinite(water.get_forces()).all()
    assert energies["float32"] == pytest.approx(energies["float64"], abs=1e-4)


def test_is2re_task_predicts_energy_only():
    datamodule = IS2REDataModule.from_devset()
    datamodule.setup("fit")
    atoms = devset_atoms(count=1)[0]
    atoms.calc = MatSciMLCalculator(IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics))
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(PropertyNotImplementedError, match="forces"):
        atoms.get_forces()


def test_bfgs_relaxation_lowers_the_energy_and_converges(checkpoint):
    atoms = devset_atoms(split="test", count=1)[0]  # sub-surface atoms fixed, as in OC20
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint, max_neighbors=None)
    atoms.rattle(stdev=0.1, seed=0)  # away from the stored geometry (FixAtoms keeps the fixed ones)
    start = atoms.get_potential_energy()
    # a briefly trained model has gentle forces: converge to a tenth of the starting ones
    fmax = 0.1 * np.linalg.norm(atoms.get_forces(), axis=1).max()
    assert BFGS(atoms, logfile=None).run(fmax=fmax, steps=300)
    assert atoms.get_potential_energy() < start
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() <= fmax


def test_md_conserves_energy_and_never_returns_nan(checkpoint):
    atoms = devset_atoms(count=1)[0]
    atoms.set_constraint()
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64", max_neighbors=None)
    # Maxwell-Boltzmann momenta at 300 K
    kinetic = np.sqrt(atoms.get_masses() * units.kB * 300)[:, None]
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)) * kinetic)
    # NVE, velocity Verlet, 1 fs, 100 steps: the total energy may drift by at most 2 meV per atom
    total = []
    nve = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    nve.attach(lambda: total.append(atoms.get_total_energy()), interval=1)
    nve.run(100)
    drift = (max(total) - min(total)) / len(atoms)
    assert np.isfinite(total).all() and drift < 2e-3, drift
    # Langevin (NVT), 100 steps: no NaN, temperature stays physical
    langevin = Langevin(
        atoms,
        timestep=1.0 * units.fs,
        temperature_K=300,
        friction=0.02,
        fixcm=False,
        rng=np.random.default_rng(0),
        logfile=None,
    )
    langevin.run(100)
    assert np.isfinite(atoms.get_positions()).all() and np.isfinite(atoms.get_forces()).all()
    assert 0 < atoms.get_temperature() < 3000


def test_refuses_foreign_checkpoints(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, path)
    with pytest.raises(ValueError, match="is not a matsciml checkpoint"):
        load_task(path)
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {"class_path": "x"}, "_class_path": "os.system"}}, path)
    with pytest.raises(ValueError, match="task class 'os.system' is in module 'os', which is not trusted"):
        load_task(path)


def test_exported_package_gives_the_checkpoints_results(checkpoint, tmp_path):
    from matsciml.artifacts.export import export_package

    export_package(checkpoint, tmp_path / "model.msml")  # a bare Trainer's checkpoint exports too
    atoms = devset_atoms(count=1)[0]
    results = []
    package = tmp_path / "model.msml"
    for calc in (MatSciMLCalculator.from_checkpoint(checkpoint), MatSciMLCalculator.from_package(package)):
        atoms.calc = calc
        results.append((atoms.get_potential_energy(), atoms.get_forces()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.fixture(scope="module")
def capped_checkpoint(tmp_path_factory) -> Path:
    """As ``checkpoint``, but trained on graphs capped at 12 neighbours (devset atoms have ~40-80)."""
    torch.manual_seed(0)
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False, max_neighbors=12)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(S2EFTask(tiny_egnn(), lr=3e-3), datamodule=datamodule)
    path = tmp_path_factory.mktemp("capped") / "capped.ckpt"
    trainer.save_checkpoint(path)
    return path


def _energy(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy()


def test_checkpoints_record_the_training_graph(checkpoint, capped_checkpoint):
    assert load_task(checkpoint).graph == {"cutoff": 6.0, "max_neighbors": None}
    assert load_task(capped_checkpoint).graph == {"cutoff": 6.0, "max_neighbors": 12}


def test_the_recorded_cap_is_used_with_a_warning_unless_overridden(capped_checkpoint):
    atoms = devset_atoms(count=1)[0]
    with pytest.warns(UserWarning, match="only the 12 nearest neighbours.*max_neighbors=None"):
        as_trained = _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint), atoms)
    with pytest.warns(UserWarning, match="12 nearest"):
        explicit = _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint, max_neighbors=12), atoms)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cap, no warning
        uncapped = _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint, max_neighbors=None), atoms)
    assert as_trained == explicit and abs(as_trained - uncapped) > 1e-6
    with pytest.raises(ValueError, match="max_neighbors must be 'trained', None or a positive integer"):
        MatSciMLCalculator.from_checkpoint(capped_checkpoint, max_neighbors=0)


def test_a_checkpoint_without_a_graph_record_gets_no_cap(capped_checkpoint, tmp_path):
    saved = torch.load(capped_checkpoint, map_location="cpu", weights_only=True)
    del saved["hyper_parameters"]["graph"]  # as written before tasks recorded their graph
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    atoms = devset_atoms(count=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calc = MatSciMLCalculator.from_checkpoint(old)
        assert calc.graph == {"representation": "graph", "max_neighbors": None, "cutoff": 6.0}
        energy = _energy(calc, atoms)
    with pytest.warns(UserWarning):
        capped = _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint), atoms)
    assert energy == _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint, max_neighbors=None), atoms)
    assert energy != capped


def test_exported_packages_carry_the_graph_in_model_json_and_card(capped_checkpoint, tmp_path):
    out = export_package(capped_checkpoint, tmp_path / "pkg")
    description = json.loads((out / "model.json").read_text())
    assert description["task"]["init_args"]["graph"] == {"cutoff": 6.0, "max_neighbors": 12}
    card = json.loads((out / "card.json").read_text())
    assert card["radius_graph"]["max_neighbors"] == 12 and "jump" in card["radius_graph"]["note"]
    atoms = devset_atoms(count=1)[0]
    with pytest.warns(UserWarning, match="12 nearest"):
        from_package = _energy(MatSciMLCalculator.from_package(out), atoms)
    with pytest.warns(UserWarning, match="12 nearest"):
        assert from_package == pytest.approx(
            _energy(MatSciMLCalculator.from_checkpoint(capped_checkpoint), atoms), abs=1e-6
        )


def test_training_on_other_graphs_than_recorded_is_refused():
    task = S2EFTask(tiny_egnn(), graph={"cutoff": 6.0, "max_neighbors": None})
    datamodule = S2EFDataModule.from_devset(batch_size=4, max_neighbors=12)
    with pytest.raises(ValueError, match="trained on radius graphs .* but the data module builds"):
        quiet_trainer(max_epochs=1, limit_train_batches=1).fit(task, datamodule=datamodule)
    with pytest.raises(ValueError, match="graph.max_neighbors must be a positive integer or None"):
        S2EFTask(tiny_egnn(), graph={"cutoff": 6.0, "max_neighbors": 0})


def test_elements_the_model_never_saw_are_refused(checkpoint, tmp_path):
    species = load_task(checkpoint).species
    assert species and 2 not in species, "fit records the training data's elements in the task"
    export_package(checkpoint, tmp_path / "model.msml")
    atoms = devset_atoms(count=1)[0]
    atoms.numbers[[0, 3]] = 2  # helium, which the S2EF devset does not hold
    trained = ", ".join(chemical_symbols[z] for z in species)
    for calc in (
        MatSciMLCalculator.from_checkpoint(checkpoint),
        MatSciMLCalculator.from_package(tmp_path / "model.msml"),
    ):
        atoms.calc = calc
        with pytest.raises(
            DataError,
            match=rf"holds He \(Z=2\), which the model never saw in training; it was trained on {trained} only",
        ):
            atoms.get_potential_energy()


def test_atoms_too_close_are_refused_with_their_indices(checkpoint):
    atoms = devset_atoms(count=1)[0]
    atoms.set_constraint()
    atoms.positions[5] = atoms.positions[2] + [0.0, 0.03, 0.0]
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint)
    with pytest.raises(
        DataError,
        match=r"<atoms>, record 0: .*atoms 2 and 5 are 0\.03 Å apart, closer than the minimum distance 0\.1 Å",
    ):
        atoms.get_potential_energy()
    atoms.calc = MatSciMLCalculator.from_checkpoint(checkpoint, min_distance=0.01)  # the rule is a setting
    assert np.isfinite(atoms.get_potential_energy())


def test_an_isolated_atom_gets_its_reference_plus_a_constant():
    # no neighbour: the energy is the model's readout of the bare atom plus the element reference,
    # wherever the atom sits, with or without a cell; the force is exactly zero
    torch.manual_seed(0)
    model = tiny_egnn()
    task = S2EFTask(model, element_references={29: -3.7, 8: -1.5}, normalize=False, species=[8, 29]).eval()
    readout = float(model(batch_from_atoms(Atoms("Cu"), cutoff=6.0)).detach()[0])
    placements = (
        Atoms("Cu", positions=[[0.0, 0.0, 0.0]]),
        Atoms("Cu", positions=[[3.0, -2.0, 1.0]], cell=np.eye(3) * 20.0, pbc=True),
    )
    for atoms in placements:
        atoms.calc = MatSciMLCalculator(task)
        assert atoms.get_potential_energy() == pytest.approx(-3.7 + readout, abs=1e-6)
        assert np.array_equal(atoms.get_forces(), np.zeros((1, 3)))
