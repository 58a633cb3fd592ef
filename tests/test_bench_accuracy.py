"""experiments/bench_accuracy.py's scoring and conversion (the runs themselves need nequip's environment)."""

import importlib.util
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.constraints import FixAtoms

from matsciml.data.datasets import S2EFDataset

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def modules():
    """(bench_accuracy, bench_accuracy_scoring); the script imports its siblings from experiments/."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield _load("bench_accuracy"), _load("bench_accuracy_scoring")
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def bench(modules):
    return modules[0]


@pytest.fixture(scope="module")
def scoring(modules):
    return modules[1]


@pytest.fixture(scope="module")
def records(s2ef_path):
    dataset = S2EFDataset(s2ef_path)
    return [dataset.read(i) for i in range(len(dataset))]


def test_extxyz_for_nequip_keeps_labels_and_fixed_atoms(scoring, records, tmp_path):
    # labelled forces on fixed atoms too (OC20's are not zero): they must come back, not zeroed by FixAtoms
    rng = np.random.default_rng(0)
    records = [dict(r, forces=rng.normal(size=r["forces"].shape).astype(np.float32)) for r in records]
    path = tmp_path / "train.xyz"
    scoring.write_extxyz(records, path)
    frames = ase.io.read(path, index=":")
    assert len(frames) == len(records) and not list(tmp_path.glob("*.partial*"))
    for atoms, record in zip(frames, records, strict=True):
        np.testing.assert_array_equal(atoms.numbers, record["atomic_numbers"])
        np.testing.assert_allclose(atoms.positions, record["positions"], atol=1e-6)
        np.testing.assert_allclose(atoms.get_potential_energy(), record["energy"], rtol=1e-7)
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), record["forces"], atol=1e-6)
        fixed = np.zeros(len(atoms), bool)
        for constraint in atoms.constraints:
            assert isinstance(constraint, FixAtoms)
            fixed[constraint.index] = True
        np.testing.assert_array_equal(fixed, record["fixed"].astype(bool))


def test_errors_are_per_atom_energies_and_free_atom_forces(scoring, records):
    assert any(r["fixed"].any() for r in records), "the fixture should hold fixed atoms"
    energy = np.array([float(r["energy"]) for r in records])
    forces = np.concatenate([r["forces"] for r in records]).astype(np.float64)
    exact = scoring.errors(energy, forces, records)
    assert exact["energy_mae_mev_per_atom"] == 0 and exact["force_mae_mev_per_a"] == 0
    natoms = np.array([len(r["forces"]) for r in records])
    # 1 eV too high on every structure: 1000 / N meV per atom, averaged over structures
    shifted = scoring.errors(energy + 1.0, forces, records)
    assert shifted["energy_mae_mev_per_atom"] == pytest.approx(1000 * np.mean(1 / natoms))
    free = np.concatenate([~r["fixed"].astype(bool) for r in records])
    zero = scoring.errors(energy, np.zeros_like(forces), records)
    assert zero["force_mae_mev_per_a"] == pytest.approx(1000 * np.abs(forces[free]).mean())
    assert zero["force_mae_all_atoms_mev_per_a"] == pytest.approx(1000 * np.abs(forces).mean())
    with pytest.raises(ValueError, match="do not match"):
        scoring.errors(energy[:-1], forces, records)


def test_baselines_predict_the_training_mean_energy_per_atom_and_zero_forces(scoring, records):
    train, test = records[:8], records[8:]
    result = scoring.baselines(train, test)
    mean = np.mean([float(r["energy"]) / len(r["forces"]) for r in train])
    expected = np.mean([abs(mean - float(r["energy"]) / len(r["forces"])) for r in test])
    assert result["mean energy"]["energy_mae_mev_per_atom"] == pytest.approx(1000 * expected)
    assert result["zero forces"]["force_mae_mev_per_a"] > 0
    # the composition fit reproduces energies that are exactly linear in the element fractions
    elements = sorted({int(z) for r in records for z in r["atomic_numbers"]})
    linear = [dict(r, energy=np.float64(len(r["forces"]) * (0.5 + 0.01 * r["atomic_numbers"].mean()))) for r in records]
    assert len(elements) > 1
    assert scoring.baselines(linear[:8], linear[8:])["composition fit"]["energy_mae_mev_per_atom"] < 1e-6


def test_lightning_max_time_and_nequip_small_model(bench):
    assert bench.max_time(1) == "00:00:01:00" and bench.max_time(15) == "00:00:15:00"
    assert bench.max_time(90.5) == "00:01:30:30"
    files = {s: f"/data/{s}.xyz" for s in ("train", "val", "test")}
    config = bench.nequip_config(files, ["Cu", "Pt"], "/runs/x", "00:00:05:00", 5.0, per_type_scales=True)
    model = config["training_module"]["model"]
    assert (model["num_layers"], model["l_max"], model["parity"], model["num_features"]) == (3, 1, True, 32)
    assert (model["r_max"], model["num_bessels"], model["polynomial_cutoff_p"]) == (5.0, 8, 6)
    assert (model["radial_mlp_depth"], model["radial_mlp_width"], model["model_dtype"]) == (2, 64, "float32")
    assert model["per_type_energy_scales"] == "${training_data_stats:per_type_forces_rms}"
    module = config["training_module"]
    assert module["ema_decay"] == 0.999 and module["optimizer"]["lr"] == 0.01
    assert module["lr_scheduler"]["monitor"] == config["trainer"]["callbacks"][0]["monitor"] == "val0_epoch/forces_mae"
    assert config["data"]["train_dataloader"]["batch_size"] == 5
    assert config["trainer"]["max_time"] == "00:00:05:00" and config["trainer"]["max_epochs"] == -1
    fallback = bench.nequip_config(files, ["Cu"], "/runs/x", "00:00:05:00", 5.0, per_type_scales=False)
    assert fallback["training_module"]["model"]["per_type_energy_scales"] == "${training_data_stats:forces_rms}"
