"""The torch-sim model: agrees with the ASE calculator, relaxes 16 slabs in one batch, runs NVE like ASE."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet
from helpers.emt import atoms_from, read_split
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.devsets import devset_path
from matsciml.data.errors import DataError
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.tasks import S2EFTask

ts = pytest.importorskip("torch_sim")
from matsciml.integrations.torch_sim import MatSciMLModel  # noqa: E402  (after the skip: needs torch_sim)


def devset_slabs(count: int) -> list[Atoms]:
    """The first frame of ``count`` systems of the S2EF train split (the elements the model saw),
    without their FixAtoms constraints: torch-sim 0.3 has no constraints."""
    records, _ = read_split(devset_path("s2ef", "train"))
    first = {}
    for record in records:
        first.setdefault(int(record["sid"]), record)
    return [atoms_from(record) for record in list(first.values())[:count]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An EGNN trained three epochs on the S2EF devset with forces and stress heads (the devset has no
    stress labels, so stress is the strain derivative of a trained energy)."""
    torch.manual_seed(0)
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    task = S2EFTask(tiny_egnn(), lr=3e-3, regress_stress=True)
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=1)
    with pytest.warns(UserWarning, match="no 'stress' labels"):
        trainer.fit(task, datamodule=datamodule)
    path = tmp_path_factory.mktemp("torch_sim") / "s2ef.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-9), ("float32", 2e-4)])
def test_energy_forces_and_stress_match_the_ase_calculator(checkpoint, dtype, atol):
    structures = devset_slabs(6)
    assert len({len(atoms) for atoms in structures}) > 1  # systems of different sizes in one batch
    model = MatSciMLModel.from_checkpoint(checkpoint, dtype=dtype, max_neighbors=None)
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    out = model(state)
    assert out["energy"].shape == (6,) and out["stress"].shape == (6, 3, 3)
    assert out["energy"].dtype == getattr(torch, dtype)
    calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype=dtype, max_neighbors=None)
    start = 0
    for index, atoms in enumerate(structures):
        atoms.calc = calc
        end = start + len(atoms)
        energy = atoms.get_potential_energy()
        assert float(out["energy"][index]) == pytest.approx(energy, abs=atol * max(1.0, abs(energy)))
        np.testing.assert_allclose(out["forces"][start:end].double().numpy(), atoms.get_forces(), atol=atol)
        # torch-sim's stress is ASE's, (1/V) dE/dstrain, as a full 3x3 matrix
        full = atoms.get_stress(voigt=False)
        np.testing.assert_allclose(out["stress"][index].double().numpy(), full, atol=atol)
        assert np.abs(full).max() > 1e-6  # a real stress, not zeros on both sides
        start = end


def test_molecules_without_a_cell_match_the_calculator_and_have_no_stress(checkpoint):
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], pbc=False)
    ammonia = Atoms("NH3", positions=[[0, 0, 0], [1.01, 0, 0], [-0.34, 0.95, 0], [-0.34, -0.47, 0.82]], pbc=False)
    model = MatSciMLModel.from_checkpoint(checkpoint, dtype="float64")
    out = model(ts.io.atoms_to_state([water, ammonia], model.device, model.dtype))
    assert bool(out["stress"].isnan().all())  # stress is undefined without a cell
    calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64")
    for index, (atoms, rows) in enumerate([(water, slice(0, 3)), (ammonia, slice(3, 7))]):
        atoms.calc = calc
        assert float(out["energy"][index]) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(out["forces"][rows].numpy(), atoms.get_forces(), atol=1e-9)


def test_passes_torch_sims_own_interface_checks():
    from torch_sim.models.interface import validate_model_outputs

    torch.manual_seed(1)  # untrained, no species recorded: its Si and Fe test systems pass
    model = MatSciMLModel(S2EFTask(tiny_egnn(), regress_stress=True), dtype="float64", max_neighbors=None)
    validate_model_outputs(model, torch.device("cpu"), torch.float64)


@pytest.mark.slow
def test_batched_fire_relaxes_16_devset_slabs(checkpoint):
    """``torch_sim.optimize`` with FIRE on 16 slabs in one state converges every system.

    The briefly trained test model has no short-range repulsion (the devset holds no close
    contacts): its minima can pull atoms onto each other (in a trial, below the default 0.1 Å
    guard after ~90 FIRE steps). The test checks the batched relaxation, not the model, so the
    guard is off here.
    """
    structures = devset_slabs(16)
    for index, atoms in enumerate(structures):
        atoms.rattle(stdev=0.1, seed=index)
    model = MatSciMLModel.from_checkpoint(checkpoint, max_neighbors=None, min_distance=0)  # float32, as trained
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    start = model(state)
    # the model's forces are gentle (a few hundredths of eV/Å): converge every system to a tenth
    # of the largest starting force
    fmax = 0.1 * float(start["forces"].norm(dim=1).max())
    relaxed = ts.optimize(
        system=state,
        model=model,
        optimizer=ts.optimizers.fire,
        convergence_fn=ts.generate_force_convergence_fn(fmax, include_cell_forces=False),
        max_steps=1000,
    )
    assert relaxed.n_systems == 16
    assert torch.equal(relaxed.atomic_numbers, state.atomic_numbers)  # back in the input order
    end = model(relaxed)
    norms = end["forces"].norm(dim=1)
    per_system = torch.zeros(16).scatter_reduce(0, relaxed.system_idx, norms, "amax", include_self=False)
    assert bool((per_system < fmax).all()), per_system
    assert bool((end["energy"] < start["energy"]).all())


def test_nve_conserves_energy_as_well_as_ase_velocity_verlet(checkpoint):
    """The same structures, initial momenta, time step and model (float64, a smooth surface):
    torch-sim's batched NVE drifts no more than ASE's VelocityVerlet with the calculator."""
    structures = devset_slabs(3)
    steps, dt = 100, 1.0 * units.fs
    for index, atoms in enumerate(structures):
        thermalize_momenta(atoms, temperature_K=600, rng=np.random.default_rng(index))
    model = MatSciMLModel.from_checkpoint(checkpoint, dtype="float64", max_neighbors=None)
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    init, update = ts.nve(model, dt=torch.tensor(dt, dtype=torch.float64), kT=torch.tensor(0.0, dtype=torch.float64))
    md = init(state)
    md.momenta = torch.as_tensor(np.concatenate([atoms.get_momenta() for atoms in structures]))
    totals = []
    for _ in range(steps + 1):
        kinetic = ts.calc_kinetic_energy(masses=md.masses, momenta=md.momenta, system_idx=md.system_idx)
        totals.append((md.energy + kinetic).numpy())
        md = update(md)
    torch_sim_drift = np.abs(np.array(totals) - totals[0]).max(axis=0)

    calc = MatSciMLCalculator.from_checkpoint(checkpoint, dtype="float64", max_neighbors=None)
    ase_drift, kinetic_start = [], []
    for atoms in structures:
        atoms.calc = calc
        kinetic_start.append(atoms.get_kinetic_energy())
        ase_totals = [atoms.get_total_energy()]
        dyn = VelocityVerlet(atoms, timestep=dt, logfile=None)
        dyn.attach(lambda atoms=atoms, totals=ase_totals: totals.append(atoms.get_total_energy()))
        dyn.run(steps)
        ase_drift.append(np.abs(np.array(ase_totals[1:]) - ase_totals[0]).max())
    ase_drift = np.array(ase_drift)
    # the same integrator on the same surface: drifts agree to a margin (measured: 2e-8 to 4e-7 eV
    # on both paths, equal to three digits), and are small against the kinetic energy (~2-3 eV)
    np.testing.assert_array_less(torch_sim_drift, 1.5 * ase_drift + 1e-9)
    np.testing.assert_array_less(torch_sim_drift, 1e-3 * np.array(kinetic_start))


def test_refuses_elements_the_model_never_saw(checkpoint):
    model = MatSciMLModel.from_checkpoint(checkpoint)
    slabs = devset_slabs(2)
    slabs[1].numbers[0] = 26  # Fe: not in the S2EF train split
    state = ts.io.atoms_to_state(slabs, model.device, model.dtype)
    with pytest.raises(DataError, match=r"<SimState system 1>: .*Fe \(Z=26\).*never saw"):
        model(state)


def test_a_task_without_forces_is_refused():
    with pytest.raises(ValueError, match="regress_forces=True"):
        MatSciMLModel(S2EFTask(tiny_egnn(), regress_forces=False))


def test_from_package_and_run_folder_agree(checkpoint, tmp_path):
    from matsciml.artifacts.export import export_package

    package = export_package(checkpoint, tmp_path / "pkg")
    state = ts.io.atoms_to_state(devset_slabs(2), torch.device("cpu"), torch.float64)
    a = MatSciMLModel.from_package(package, dtype="float64", max_neighbors=None)(state)
    b = MatSciMLModel(load_task(checkpoint), dtype="float64", max_neighbors=None)(state)
    torch.testing.assert_close(a["forces"], b["forces"])


def test_missing_extra_is_named_and_matsciml_imports_without_it():
    script = (
        "import sys; sys.modules['torch_sim'] = None\n"  # as if torch-sim were not installed
        "import matsciml, matsciml.integrations.calculators\n"
        "try:\n    import matsciml.integrations.torch_sim\n"
        "except ImportError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "matsciml[torchsim]" in result.stdout and "torch-sim-atomistic" in result.stdout
