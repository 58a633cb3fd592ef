"""Batch prediction: over Atoms from Python, and file to file with resume."""

import warnings

import numpy as np
import pytest
import torch
from ase.io import read, write
from helpers.emt import atoms_from, read_split
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.devsets import devset_path
from matsciml.integrations import batch_prediction
from matsciml.integrations.batch_prediction import predict_atoms, predict_files
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.tasks import S2EFTask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn())
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4))
    path = tmp_path_factory.mktemp("bp") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def structures():
    records, _ = read_split(devset_path("s2ef", "val"))
    return [atoms_from(r) for r in records[:10]]


def test_predict_atoms_matches_the_calculator(checkpoint, structures):
    results = predict_atoms(load_task(checkpoint), structures, batch_size=4, num_workers=1)
    assert len(results) == len(structures)
    calc = MatSciMLCalculator.from_checkpoint(checkpoint)
    for original, result in zip(structures, results, strict=True):
        assert original.calc is None  # inputs untouched
        atoms = original.copy()
        atoms.calc = calc
        assert result.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(result.get_forces(), atoms.get_forces(), atol=1e-6)


def test_files_in_extxyz_out_and_resume(checkpoint, structures, tmp_path, monkeypatch):
    write(tmp_path / "a.extxyz", structures[:6])
    write(tmp_path / "b.traj", structures[6:])
    inputs, out = [tmp_path / "a.extxyz", tmp_path / "b.traj"], tmp_path / "predictions.extxyz"
    task = load_task(checkpoint)
    reference = predict_atoms(task, structures)

    # a run killed after its second batch: the file holds two batches, the third was half written
    real_batches = batch_prediction._batches

    def dies_after_two(*args, **kwargs):
        for index, batch in enumerate(real_batches(*args, **kwargs)):
            if index == 2:
                with open(tmp_path / "predictions.extxyz.partial", "a") as handle:
                    handle.write("37\nhalf a frame")
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(batch_prediction, "_batches", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        predict_files(task, inputs, out, batch_size=3, progress=False)
    assert not out.exists()
    monkeypatch.setattr(batch_prediction, "_batches", real_batches)
    assert predict_files(task, inputs, out, batch_size=3, progress=False) == 10
    assert not (tmp_path / "predictions.extxyz.partial").exists()
    written = read(out, index=":")
    assert len(written) == 10
    for atoms, expected in zip(written, reference, strict=True):
        assert atoms.get_potential_energy() == pytest.approx(expected.get_potential_energy(), rel=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), expected.get_forces(), atol=1e-6)
        np.testing.assert_allclose(atoms.positions, expected.positions, atol=1e-7)  # extxyz keeps 8 decimals


def test_cli_writes_extxyz_and_a_record(checkpoint, structures, tmp_path, capsys):
    from matsciml.cli.app import main
    from matsciml.records.provenance import load_record

    write(tmp_path / "in.extxyz", structures[:5])
    out = tmp_path / "out.extxyz"
    assert (
        main(
            ["predict-structures", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(out), "--batch-size", "2"]
        )
        == 0
    )
    assert "wrote 5 structures" in capsys.readouterr().out
    written = read(out, index=":")
    assert len(written) == 5 and all(np.isfinite(a.get_forces()).all() for a in written)
    record = load_record(tmp_path / "out.extxyz.step.json")
    assert record["status"] == "COMPLETED" and record["metrics"]["final"]["structures"] == 5
    assert record["outputs"][0]["kind"] == "predictions"


@pytest.fixture(scope="module")
def capped_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(S2EFTask(tiny_egnn()), datamodule=S2EFDataModule.from_devset(batch_size=4, max_neighbors=12))
    path = tmp_path_factory.mktemp("bp_capped") / "capped.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_predict_atoms_uses_the_recorded_cap_with_one_warning(capped_checkpoint, structures):
    task = load_task(capped_checkpoint)
    with pytest.warns(UserWarning, match="12 nearest") as caught:
        capped = predict_atoms(task, structures[:4], batch_size=2)
    assert len([w for w in caught if "nearest" in str(w.message)]) == 1  # once per call, not per batch
    explicit = predict_atoms(task, structures[:4], max_neighbors=None)
    assert all(a.get_potential_energy() != b.get_potential_energy() for a, b in zip(capped, explicit, strict=True))
    with pytest.warns(UserWarning, match="12 nearest"):
        calc = MatSciMLCalculator.from_checkpoint(capped_checkpoint)
    atoms = structures[0].copy()
    atoms.calc = calc
    assert capped[0].get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-5)


def test_cli_max_neighbors_zero_removes_the_recorded_cap(capped_checkpoint, structures, tmp_path):
    from matsciml.cli.app import main

    write(tmp_path / "in.extxyz", structures[:2])
    arguments = ["predict-structures", str(capped_checkpoint), str(tmp_path / "in.extxyz"), "--out"]
    with pytest.warns(UserWarning, match="12 nearest"):
        assert main([*arguments, str(tmp_path / "capped.extxyz")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main([*arguments, str(tmp_path / "all.extxyz"), "--max-neighbors", "0"]) == 0
    reference = predict_atoms(load_task(capped_checkpoint), structures[:2], max_neighbors=None)
    for atoms, expected in zip(read(tmp_path / "all.extxyz", index=":"), reference, strict=True):
        assert atoms.get_potential_energy() == pytest.approx(expected.get_potential_energy(), rel=1e-6)


def test_elements_the_model_never_saw_are_refused_before_anything_is_written(checkpoint, structures, tmp_path, capsys):
    from matsciml.cli.app import main

    unseen = [atoms.copy() for atoms in structures[:3]]
    unseen[2].numbers[0] = 2  # helium, which the S2EF devset does not hold
    write(tmp_path / "in.extxyz", unseen)
    out = tmp_path / "out.extxyz"
    assert main(["predict-structures", str(checkpoint), str(tmp_path / "in.extxyz"), "--out", str(out)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"matsciml: error: {tmp_path / 'in.extxyz'}, record 2: ") and "He (Z=2)" in message
    assert not out.exists() and not list(tmp_path.glob("out.extxyz.partial*"))
    with pytest.raises(ValueError, match=r"<structures>, record 2: .*never saw in training"):
        predict_atoms(load_task(checkpoint), unseen)
