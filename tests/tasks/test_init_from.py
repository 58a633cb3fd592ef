"""init_from: a trained checkpoint or package initialises a new task by name and shape, grows to new species,
refits the element references on the new data, trains with two learning rates, and is never read again after
the fit started (resume, validate, export).

The parent is a tiny EGNN fitted on EMT slabs of Cu, Pd, Au with H or N; the fine-tune data are slabs of Ni, Cu
with C or O: elements the parent lacks (Ni, C, O), and without some it has (Pd, Au, H, N). Both are LMDB datasets
written in the test session.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.structures import slab_record
from helpers.training import QUICK_FIT, quiet_trainer, tiny_egnn

from matsciml.artifacts.export import export_package, load_model
from matsciml.artifacts.model_loading import read_checkpoint
from matsciml.artifacts.trust import UntrustedClassError
from matsciml.cli.app import main
from matsciml.data import IS2REDataModule, S2EFDataModule
from matsciml.data.formats.store import DatasetWriter
from matsciml.tasks import IS2RETask, S2EFTask
from matsciml.tasks.ema import EMAWeightAveraging

ROOT = Path(__file__).resolve().parents[2]
PARENT_DATA = [("Cu", "H"), ("Pd", "N"), ("Au", "H"), ("Cu", "N"), ("Pd", "H"), ("Au", "N")]
PARENT_SPECIES = [1, 7, 29, 46, 79]
NEW_DATA = [("Ni", "C"), ("Ni", "O"), ("Cu", "C"), ("Cu", "O")]
TINY = {"hidden": 8, "num_layers": 1, "projection_hidden": 16, "output_hidden": 8, "num_radial": 4}


def load_only(task: S2EFTask, datamodule: S2EFDataModule) -> S2EFTask:
    """A Lightning fit that configures the optimiser (so loads the parent) and trains nothing."""
    quiet_trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0).fit(task, datamodule)
    return task


def write_slabs(root: Path, systems: list[tuple[str, str]], seeds: dict[str, range]) -> list[dict]:
    """EMT slabs ``(metal, adsorbate)`` in turn, one dataset per split; returns the train records."""
    records = []
    for split, split_seeds in seeds.items():
        with DatasetWriter(root / split, task="s2ef", source="tests") as writer:
            for seed in split_seeds:
                metal, adsorbate = systems[seed % len(systems)]
                record = slab_record(seed, metal=metal, adsorbate=adsorbate)
                writer.add(record)
                records += [record] if split == "train" else []
    return records


def datamodule(root: Path) -> S2EFDataModule:
    return S2EFDataModule(train_path=root / "train", val_path=root / "val", batch_size=4, cutoff=6.0)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A two-layer EGNN (Z up to 79) with fitted element references, trained briefly."""
    root = tmp_path_factory.mktemp("parent_data")
    write_slabs(root, PARENT_DATA, {"train": range(12), "val": range(12, 14)})
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(num_species=79, num_layers=2), element_references="fit")
    data = datamodule(root)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, data)
    path = tmp_path_factory.mktemp("parent") / "parent.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    """EMT slabs of Ni and Cu with C or O on top (train 8, val 4): the folder and the train records."""
    root = tmp_path_factory.mktemp("new_data")
    return root, write_slabs(root, NEW_DATA, {"train": range(8), "val": range(8, 12)})


def parent_state(parent) -> dict[str, torch.Tensor]:
    return read_checkpoint(parent)["state_dict"]


def test_old_species_rows_are_the_parents_and_new_ones_the_fresh_init(parent, new_data):
    torch.manual_seed(1)
    task = S2EFTask(tiny_egnn(num_layers=2), init_from=str(parent))  # num_species 100: 21 more rows
    fresh = {k: v.clone() for k, v in task.state_dict().items()}
    load_only(task, datamodule(new_data[0]))
    old, state = parent_state(parent), task.state_dict()
    rows = old["model.embedding.weight"].shape[0]
    assert rows == 80 and state["model.embedding.weight"].shape[0] == 101
    assert torch.equal(state["model.embedding.weight"][:rows], old["model.embedding.weight"])
    assert torch.equal(state["model.embedding.weight"][rows:], fresh["model.embedding.weight"][rows:])
    report = task.init_report
    assert report["parent"] == str(parent) and task.hparams["init_from"] == str(parent)
    assert report["extended"] == ["model.embedding.weight"] and report["new"] == report["dropped"] == []
    assert set(report["loaded"]) == set(state) - {"model.embedding.weight"}
    for name in report["loaded"]:
        if not name.startswith("normalizer.") and name not in ("mean_energy", "fitted"):  # refit on the new data
            assert torch.equal(state[name], old[name]), name
    # what the calculator accepts: the parent's elements and the new data's
    assert task.species == sorted({*PARENT_SPECIES, 6, 8, 28, 29})


def test_a_second_fit_of_the_task_continues_from_its_weights(parent, new_data, tmp_path):
    copy = Path(shutil.copy(parent, tmp_path / "parent.ckpt"))
    task = load_only(S2EFTask(tiny_egnn(num_layers=2), init_from=str(copy)), datamodule(new_data[0]))
    copy.unlink()
    trained = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trained.fit(task, datamodule(new_data[0]))  # the parent is not read again, nor laid over the weights
    assert task.init_report["parent"] == str(copy)


def test_new_and_dropped_tensors_are_reported(parent, new_data):
    deeper = load_only(
        S2EFTask(tiny_egnn(num_species=79, num_layers=3), init_from=str(parent)), datamodule(new_data[0])
    )
    assert deeper.init_report["new"] and all(n.startswith("model.layers.2.") for n in deeper.init_report["new"])
    assert deeper.init_report["dropped"] == []
    shallower = load_only(
        S2EFTask(tiny_egnn(num_species=79, num_layers=1), init_from=str(parent)), datamodule(new_data[0])
    )
    dropped = shallower.init_report["dropped"]
    assert dropped and all(n.startswith("model.layers.1.") for n in dropped) and shallower.init_report["new"] == []


def test_a_package_initialises_as_its_checkpoint_does(parent, new_data, tmp_path):
    package = export_package(parent, tmp_path / "parent.zip")
    torch.manual_seed(2)
    from_package = load_only(S2EFTask(tiny_egnn(num_layers=2), init_from=str(package)), datamodule(new_data[0]))
    torch.manual_seed(2)
    from_checkpoint = load_only(S2EFTask(tiny_egnn(num_layers=2), init_from=str(parent)), datamodule(new_data[0]))
    assert from_package.init_report["extended"] == ["model.embedding.weight"]
    for name, value in from_checkpoint.state_dict().items():
        assert torch.equal(from_package.state_dict()[name], value), name


def test_a_shape_change_that_is_no_species_extension_is_a_clear_error(parent, new_data):
    task = S2EFTask(tiny_egnn(num_layers=2, hidden=16), init_from=str(parent))
    message = (
        r"model\.projection\.\S+ has shape \(8, 16\) in the parent but \(16, 16\) here.* differs in hidden: 8 -> 16"
    )
    with pytest.raises(ValueError, match=message):
        load_only(task, datamodule(new_data[0]))
    assert task.init_report is None


def residuals(records, references: dict[int, float]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-atom energies less the references, and each structure's element fractions (columns: elements)."""
    elements = sorted({int(z) for r in records for z in r["atomic_numbers"]})
    fractions = np.array([[np.mean(r["atomic_numbers"] == z) for z in elements] for r in records])
    per_atom = np.array([float(r["energy"]) / len(r["atomic_numbers"]) for r in records])
    return per_atom - fractions @ np.array([references.get(z, 0.0) for z in elements]), fractions, elements


def test_references_are_refit_on_the_new_data_and_the_parents_shift_and_scale_stay(parent, new_data):
    old = parent_state(parent)
    task = load_only(S2EFTask(tiny_egnn(num_species=79, num_layers=2), init_from=str(parent)), datamodule(new_data[0]))
    normalizer = task.normalizer
    assert torch.equal(normalizer.scale, old["normalizer.scale"]) and torch.equal(
        normalizer.shift, old["normalizer.shift"]
    )
    references = normalizer.reference_energies()
    for z in (1, 7, 46, 79):  # not in the new data: the parent's, so their baseline is unchanged
        assert references[z] == float(old["normalizer.references"][z])
    # least squares on the new data: per-atom residuals (less the shift) average zero and are uncorrelated
    # with every element's fraction
    residual, fractions, _ = residuals(new_data[1], references)
    residual = residual - float(normalizer.shift)
    assert abs(residual.mean()) < 1e-8
    np.testing.assert_allclose((fractions - fractions.mean(0)).T @ residual, 0.0, atol=1e-8)
    assert float(task.mean_energy) == pytest.approx(np.mean([float(r["energy"]) for r in new_data[1]]))


def test_keep_parent_references_fits_only_the_elements_the_parent_lacks(parent, new_data):
    old = parent_state(parent)
    task = S2EFTask(tiny_egnn(num_species=79, num_layers=2), init_from=str(parent), keep_parent_references=True)
    references = load_only(task, datamodule(new_data[0])).normalizer.reference_energies()
    for z in PARENT_SPECIES:
        assert references[z] == float(old["normalizer.references"][z])
    assert {6, 8, 28} <= set(references)
    assert torch.equal(task.normalizer.scale, old["normalizer.scale"])
    residual, fractions, elements = residuals(new_data[1], references)
    shift = float(task.normalizer.shift)
    assert shift == pytest.approx(residual.mean(), abs=1e-10)  # re-derived under the kept references
    free = [i for i, z in enumerate(elements) if z not in PARENT_SPECIES]
    centred = fractions[:, free] - fractions[:, free].mean(0)
    np.testing.assert_allclose(centred.T @ (residual - shift), 0.0, atol=1e-8)


def test_an_s2ef_parent_passes_only_its_scale_to_an_is2re_fine_tune(parent):
    # OC20's classic route: pretrain on S2EF, fine-tune on IS2RE; adsorption energies take no element references
    data = IS2REDataModule.from_devset(batch_size=4, cutoff=6.0)
    task = load_only(IS2RETask(tiny_egnn(num_layers=2), init_from=str(parent)), data)
    normalizer, statistics = task.normalizer, data.target_statistics["relaxed_energy"]
    assert not bool(normalizer.per_atom) and normalizer.reference_energies() == {}
    assert float(normalizer.shift) == pytest.approx(statistics["mean"])
    assert torch.equal(normalizer.scale, parent_state(parent)["normalizer.scale"])


def test_pretrained_and_new_parameters_train_at_their_own_rates(parent, new_data):
    task = S2EFTask(tiny_egnn(num_layers=3), init_from=str(parent), lr=1e-2, pretrained_lr=1e-4, scheduler="plateau")
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, datamodule(new_data[0]))
    pretrained, new = trainer.optimizers[0].param_groups
    assert (pretrained["name"], pretrained["lr"], new["name"], new["lr"]) == ("pretrained", 1e-4, "new", 1e-2)
    names = {id(p): n for n, p in task.named_parameters()}
    assert {names[id(p)] for p in new["params"]} == set(task.init_report["new"])
    assert "model.embedding.weight" in {names[id(p)] for p in pretrained["params"]}
    with pytest.raises(ValueError, match="pretrained_lr .* set init_from"):
        S2EFTask(tiny_egnn(), pretrained_lr=1e-4)


def test_untrusted_classes_in_the_parent_are_refused_unimported(parent, new_data, tmp_path):
    checkpoint = torch.load(parent, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["class_path"] = "evil_models.Model"
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    task = S2EFTask(tiny_egnn(num_layers=2), init_from=str(tmp_path / "evil.ckpt"))
    with pytest.raises(UntrustedClassError, match="evil_models"):
        load_only(task, datamodule(new_data[0]))
    assert "evil_models" not in sys.modules


QUICK = [
    *QUICK_FIT,
    *(f"--model.init_args.model.init_args.{k}={v}" for k, v in TINY.items()),
]


# a resumed run writes into its own checkpoints folder, which Lightning warns about whether it resumes or not
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # validate from another run folder
def test_cli_fine_tune_resumes_validates_and_exports_without_the_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["fit", *QUICK, f"--trainer.logger.init_args.save_dir={tmp_path / 'parent'}"]) == 0
    parent = tmp_path / "parent.ckpt"
    shutil.copy(tmp_path / "parent/lightning_logs/version_0/checkpoints/last.ckpt", parent)
    tune = [*QUICK, f"--model.init_args.init_from={parent}", "--model.init_args.pretrained_lr=0.0001"]
    assert main(["fit", *tune, f"--trainer.logger.init_args.save_dir={tmp_path / 'tune'}"]) == 0
    last = tmp_path / "tune/lightning_logs/version_0/checkpoints/last.ckpt"
    checkpoint = read_checkpoint(last)
    assert checkpoint["hyper_parameters"]["init_from"] == str(parent)
    assert checkpoint["matsciml_init_report"]["parent"] == str(parent)
    parent.unlink()  # from here on nothing may need it
    resumed = [*tune, "--trainer.max_epochs=2", f"--ckpt_path={last}"]
    assert main(["fit", *resumed, f"--trainer.logger.init_args.save_dir={tmp_path / 'tune'}"]) == 0
    checkpoint = read_checkpoint(last)
    assert checkpoint["epoch"] == 1
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["initial_lr"]) for g in groups] == [("pretrained", 1e-4), ("new", 0.003)]
    for group in groups:  # ExponentialLR (gamma 0.95 in the config) stepped both, once per epoch
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.95**2)
    assert main(["validate", *QUICK, f"--ckpt_path={last}", f"--trainer.default_root_dir={tmp_path / 'v'}"]) == 0
    package = export_package(last, tmp_path / "tuned")
    assert load_model(package).init_from == str(parent)
    card = json.loads((package / "card.json").read_text())
    assert card["normalization"]["element_references_source"].startswith("least-squares refit on the fine-tuning data")


def test_the_weight_average_starts_from_the_parent(parent, new_data):
    # Lightning copies the task into the average when the fit begins, before the parent is loaded; until the
    # first update, validation (the sanity check) runs on the average, which must be the parent's weights
    torch.manual_seed(3)
    task = S2EFTask(tiny_egnn(num_species=79, num_layers=2), init_from=str(parent), ema_decay=0.9)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=1, num_sanity_val_steps=1)
    trainer.fit(task, datamodule(new_data[0]))
    (ema,) = [c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    average = ema._average_model.module.state_dict()
    assert torch.equal(average["model.embedding.weight"], parent_state(parent)["model.embedding.weight"])
