"""NequIP and MACE go the whole way a user takes them: fit through the CLI, export a package,
load it and predict through the ASE calculator, with the trained neighbour normalisation intact."""

from pathlib import Path

import pytest
import torch
from helpers.physics import slab

from matsciml.artifacts.export import load_model
from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.integrations.calculators import MatSciMLCalculator
from matsciml.tasks import S2EFTask

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.mark.parametrize("name", ["nequip", "mace"])
def test_fit_export_and_calculator_agree(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the devset config's paths are relative to the repository root
    config = f"configs/devset/s2ef-{name}.yaml"
    assert main(["fit", "--config", config, *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    task = S2EFTask.load_from_checkpoint(checkpoint, weights_only=True).eval()
    linked = task.model.spec()["init_args"]["avg_num_neighbors"]
    assert linked == pytest.approx(S2EFDataModule.from_devset(cutoff=5.0).avg_num_neighbors)

    package = tmp_path / "model.msml"
    assert main(["export", str(checkpoint), "--out", str(package)]) == 0
    exported = load_model(package)
    assert exported.model.spec() == task.model.spec()

    atoms = slab()
    atoms.calc = MatSciMLCalculator.from_checkpoint(run, which="last")
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = MatSciMLCalculator(exported)
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-5)
    torch.testing.assert_close(torch.as_tensor(atoms.get_forces()), torch.as_tensor(forces), atol=1e-5, rtol=0)
