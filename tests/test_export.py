"""matsciml export: packages from a real fit load in a fresh process, predict what the checkpoint does, and refuse
code smuggled in as a class path or a pickle."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.training import QUICK_FIT

from matsciml.artifacts.export import MODEL_FILE, TORCH_FILE, ExportError, load_model
from matsciml.artifacts.trust import UntrustedClassError
from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.records import provenance
from matsciml.tasks import S2EFTask

ROOT = Path(__file__).resolve().parents[1]
# the fresh process: load the package through the public name, predict on the saved batch, save the result;
# with this process's thread count, as parallel reductions (force sums) change their last bits with it
PREDICT = """
import sys, torch, matsciml
from matsciml.data.batch import Batch
torch.set_num_threads(int(sys.argv[4]))
task = matsciml.load_model(sys.argv[1])
batch = Batch(**torch.load(sys.argv[2], weights_only=True))
out = task(batch)
torch.save({"energy": out["energy"], "forces": out["forces"].detach()}, sys.argv[3])
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny S2EF fit through the CLI (its run folder holds the checkpoint and step.json)."""
    save_dir = tmp_path_factory.mktemp("fit")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert main(["fit", *QUICK_FIT, f"--trainer.logger.init_args.save_dir={save_dir}"]) == 0
    return save_dir / "lightning_logs" / "version_0"


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory):
    """A devset batch (saved as tensors for the other process) and the checkpoint's predictions on it."""
    datamodule = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    path = tmp_path_factory.mktemp("batch") / "batch.pt"
    torch.save(dict(batch.items()), path)
    task = S2EFTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True).eval()
    out = task(batch)
    return path, task, {"energy": out["energy"], "forces": out["forces"].detach()}


def export(checkpoint, out, *extra):
    return main(["export", str(checkpoint), "--out", str(out), *extra])


def predict_in_fresh_process(package, batch_path, tmp_path):
    result = tmp_path / "prediction.pt"
    args = [str(package), str(batch_path), str(result), str(torch.get_num_threads())]
    done = subprocess.run([sys.executable, "-c", PREDICT, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(result, weights_only=True)


def test_export_writes_a_package_with_card_and_record(run_dir, reference, tmp_path):
    checkpoint, out = run_dir / "checkpoints" / "last.ckpt", tmp_path / "model.msml"
    assert export(checkpoint, out, "--intended-use", "tests only") == 0
    assert sorted(p.name for p in out.iterdir()) == ["card.json", MODEL_FILE, TORCH_FILE]  # no step.json inside
    card = json.loads((out / "card.json").read_text())
    run_record = provenance.load_record(run_dir)
    task = reference[1]
    assert card["parameters"] == task.model.num_parameters() and card["architecture"] == "EGNN"
    assert card["cutoff"] == 6.0 and card["task"] == "s2ef" and card["outputs"] == ["energy", "forces"]
    assert card["elements"] == task.species == S2EFDataModule.from_devset().species  # the training split's
    assert card["units"]["energy"] == "eV" and card["units"]["forces"] == "eV/Å"
    assert card["intended_use"] == "tests only"
    training = card["training_data"]
    assert training["known"] and training["run_id"] == run_record["run_id"]
    datasets = {d["role"]: d["digest"] for d in training["datasets"]}
    assert datasets == {i["role"]: i["digest"] for i in run_record["inputs"] if i["kind"] == "dataset"}
    assert datasets["data.train_path"].startswith("sha256:")
    assert training["metrics"] == run_record["metrics"] and training["code"] == run_record["code"]
    assert card["checkpoint"]["sha256"] == provenance.sha256_file(checkpoint)
    assert card["exported_by"]["version"] and card["created_at"]
    model = json.loads((out / MODEL_FILE).read_text())
    assert model["task"]["class_path"] == "matsciml.tasks.S2EFTask" and "model" not in model["task"]["init_args"]
    assert model["model"] == task.hparams["model"]

    record = provenance.load_record(tmp_path / "model.msml.step.json")
    assert record["step"] == "export" and record["status"] == "COMPLETED"
    assert [(i["kind"], i["digest"]) for i in record["inputs"]] == [("checkpoint", card["checkpoint"]["sha256"])]
    outputs = {Path(o["path"]).name: o["digest"] for o in record["outputs"]}
    assert outputs == {p.name: provenance.sha256_file(p) for p in out.iterdir()}
    # skipped here, not module-wide: the security tests below must run without the test extra
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
    jsonschema.validate(record, provenance.load_schema(), format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("zipped", [False, True], ids=["folder", "zip"])
def test_package_predicts_exactly_what_the_checkpoint_does(run_dir, reference, tmp_path, zipped):
    batch_path, _, expected = reference
    out = tmp_path / ("model.zip" if zipped else "model.msml")
    assert export(run_dir / "checkpoints" / "last.ckpt", out) == 0
    assert zipfile.is_zipfile(out) == zipped and (tmp_path / f"{out.name}.step.json").is_file()
    got = predict_in_fresh_process(out, batch_path, tmp_path)
    assert torch.equal(got["energy"], expected["energy"]) and torch.equal(got["forces"], expected["forces"])
    assert got["energy"].dtype == torch.float32


@pytest.fixture
def package(run_dir, tmp_path):
    out = tmp_path / "model.msml"
    assert export(run_dir / "checkpoints" / "last.ckpt", out) == 0
    return out


@pytest.mark.parametrize("where", ["task", "model"])
@pytest.mark.parametrize("class_path", ["os.system", "antigravity.Model"])
def test_foreign_class_paths_are_refused_unrun(package, tmp_path, where, class_path):
    marker = tmp_path / "ran"
    description = json.loads((package / MODEL_FILE).read_text())
    description[where] = {"class_path": class_path, "init_args": {"command": f"touch {marker}"}}
    (package / MODEL_FILE).write_text(json.dumps(description))
    with pytest.raises(UntrustedClassError, match=f"{where} class '{class_path}' is in module .* not trusted"):
        load_model(package)
    # neither called nor imported (importing antigravity opens a web browser)
    assert not marker.exists() and "antigravity" not in sys.modules


def test_pickled_objects_in_the_weights_are_refused(package, tmp_path):
    marker = tmp_path / "ran"

    class Payload:  # what an attacker pickles: unpickling it would run a shell command
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model.embedding.weight": Payload()}, package / TORCH_FILE)
    with pytest.raises(ExportError, match="not a weights-only tensor file"):
        load_model(package)
    assert not marker.exists()


def test_oversized_members_are_refused_without_reading_them_whole(package, tmp_path, monkeypatch):
    from matsciml import export as export_module

    # a zip bomb: 32 MiB of model.json that compresses to a few kB, refused by its declared size
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in package.iterdir():
            if path.name != MODEL_FILE:
                archive.write(path, path.name)
        archive.writestr(MODEL_FILE, b" " * (32 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(ExportError, match=f"{MODEL_FILE} holds {32 << 20} bytes, more than"):
        load_model(bomb)
    # a folder member has no declared size: the chunked read stops at the cap
    monkeypatch.setitem(export_module.MAX_BYTES, MODEL_FILE, 64)
    with pytest.raises(ExportError, match=MODEL_FILE):
        load_model(package)


def test_overwriting_a_package_always_leaves_one_in_place(run_dir, package, monkeypatch):
    import shutil

    real_rmtree, removed = shutil.rmtree, []

    def watched(path, *args, **kwargs):  # whatever is deleted, a complete package stays at the destination
        real_rmtree(path, *args, **kwargs)
        removed.append(path)
        load_model(package)

    monkeypatch.setattr(shutil, "rmtree", watched)
    assert export(run_dir / "checkpoints" / "last.ckpt", package, "--overwrite") == 0
    assert removed and not [p for p in package.parent.iterdir() if p.name.startswith(".")]
    load_model(package)


def test_missing_files_are_named(package):
    (package / TORCH_FILE).unlink()
    with pytest.raises(ExportError, match="lacks weights"):
        load_model(package)


def test_cli_errors_are_one_line(run_dir, package, tmp_path, capsys):
    assert export(tmp_path / "missing.ckpt", tmp_path / "a.msml") == 2
    assert "checkpoint" in capsys.readouterr().err and not (tmp_path / "a.msml").exists()
    assert export(run_dir / "checkpoints" / "last.ckpt", package) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert export(package / MODEL_FILE, tmp_path / "b.msml") == 2  # a JSON file, not a checkpoint
    err = capsys.readouterr().err
    assert "not a readable PyTorch checkpoint" in err and len(err.strip().splitlines()) == 1
    before = provenance.sha256_file(package / "card.json")
    assert export(run_dir / "checkpoints" / "last.ckpt", package, "--overwrite", "--intended-use", "again") == 0
    assert provenance.sha256_file(package / "card.json") != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
