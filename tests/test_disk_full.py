"""A full disk while writing a checkpoint, dataset, package, predictions or step record keeps the old file.

Two ways to fill it: the files' ``open()`` returns a handle whose writes stop with ENOSPC partway
(part of the last write lands, as on a real filesystem), and a real 1 MiB tmpfs, filled with a
ballast file (skipped where mounting is not permitted: it needs root on Linux).
"""

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.io import write
from helpers.ase_inputs import emt_frames
from helpers.training import quiet_trainer, tiny_egnn
from lightning.pytorch.callbacks import ModelCheckpoint

from matsciml.atomic import DiskFullError, write_file
from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.records.provenance import write_atomically
from matsciml.tasks import S2EFTask
from matsciml.tasks.predictions import PredictionWriter
from matsciml.trainer.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]


class FullDiskFile:
    """A write handle that takes ``room`` bytes, then raises ENOSPC (after writing what still fit)."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def fill_disk_for(monkeypatch, wanted, room: int = 100) -> None:
    """Writes into files for which ``wanted(path)`` holds fail with ENOSPC after ``room`` bytes."""
    real = builtins.open

    def opener(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        return FullDiskFile(handle, room) if writing and not isinstance(file, int) and wanted(Path(file)) else handle

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) and its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".partial-" in p.name)


@pytest.fixture
def tmpfs(tmp_path) -> Path:
    """A real 1 MiB filesystem, unmounted afterwards."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int = 4096) -> None:
    """Fill ``folder``'s filesystem with a ballast file until ``leave`` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "ballast", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny S2EF task after one training step, its trainer and data."""
    data = S2EFDataModule.from_devset(batch_size=4, shuffle=False)
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), statistics=None)
    trainer = quiet_trainer(plugins=[AtomicCheckpointIO()], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(task, data)
    return SimpleNamespace(task=task, trainer=trainer, data=data)


def test_enospc_on_a_checkpoint_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    trained.trainer.save_checkpoint(target)  # Trainer -> strategy -> AtomicCheckpointIO, as ModelCheckpoint saves
    before = target.read_bytes()
    fill_disk_for(monkeypatch, lambda path: path.parent == tmp_path, room=5000)
    with pytest.raises(DiskFullError, match=f"no space left on device writing {target}"):
        trained.trainer.save_checkpoint(target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_a_full_tmpfs_keeps_the_last_checkpoint_of_a_lightning_run(trained, tmpfs):
    # epoch 1 writes last.ckpt; the disk fills; resuming for epoch 2 cannot write the new one
    def trainer(epochs: int):
        keep = ModelCheckpoint(dirpath=tmpfs, save_last=True, save_top_k=0)
        settings = dict(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0)
        return quiet_trainer(plugins=[AtomicCheckpointIO()], callbacks=[keep], enable_checkpointing=True, **settings)

    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), statistics=None)
    trainer(1).fit(task, trained.data)
    last = tmpfs / "last.ckpt"
    before = last.read_bytes()
    fill(tmpfs)
    with pytest.raises(DiskFullError, match=f"no space left on device writing {last}"):
        trainer(2).fit(task, trained.data, ckpt_path=last)
    assert last.read_bytes() == before and leftovers(tmpfs) == []


def test_the_cli_fit_writes_checkpoints_through_the_atomic_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    fill_disk_for(monkeypatch, lambda path: path.name.endswith(".tmp") and ".ckpt." in path.name, room=5000)
    argv = [
        "fit",
        "--config=configs/devset/s2ef-egnn.yaml",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("matsciml: error:")]
    assert len(lines) == 1 and "no space left on device writing" in lines[0] and ".ckpt" in lines[0]
    folder = next(tmp_path.rglob("checkpoints"))
    assert leftovers(folder) == [] and list(folder.glob("*.ckpt")) == []  # nothing half-written


def test_enospc_on_predictions_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "predictions.npz"
    trainer = SimpleNamespace(world_size=1, global_rank=0, log_dir=str(tmp_path))
    batches = [{"sid": torch.arange(3), "fid": torch.zeros(3), "energy": torch.randn(3)}]
    PredictionWriter(str(path)).write_on_epoch_end(trainer, None, [batches], None)
    before = path.read_bytes()
    fill_disk_for(monkeypatch, lambda p: p.parent == tmp_path)
    batches[0]["energy"] = torch.randn(3)
    with pytest.raises(DiskFullError, match=f"no space left on device writing {path}"):
        PredictionWriter(str(path)).write_on_epoch_end(trainer, None, [batches], None)
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert np.load(path)["energy"].shape == (3,)


def test_enospc_on_a_step_record_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "step.json"
    write_atomically(path, '{"status": "RUNNING"}\n')
    fill_disk_for(monkeypatch, lambda p: p.parent == tmp_path, room=3)
    with pytest.raises(DiskFullError, match="step.json"):
        write_atomically(path, '{"status": "COMPLETED"}\n')
    assert path.read_text() == '{"status": "RUNNING"}\n' and leftovers(tmp_path) == []


def test_a_bug_in_the_writer_is_not_called_a_full_disk(tmp_path):
    def broken(handle):
        handle.write(b"half")
        raise ZeroDivisionError("a bug")

    (tmp_path / "x").write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        write_file(tmp_path / "x", broken)
    assert (tmp_path / "x").read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trained.trainer.save_checkpoint(path)
    return path


def test_enospc_on_export_keeps_the_previous_package(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.msml"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    before = snapshot(out)
    staging = f".{out.name}.{os.getpid()}.tmp"
    fill_disk_for(monkeypatch, lambda path: path.parent.name == staging or path.name == staging)
    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"matsciml: error: no space left on device writing {out}; " + (
        "free some space and run again"
    )
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_full_tmpfs_keeps_the_previous_package_zip(checkpoint, tmpfs, capsys):
    out = tmpfs / "model.zip"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    before = snapshot(out)
    fill(tmpfs, leave=8192)  # room for the step record, not for a second package
    assert main(["export", str(checkpoint), "--out", str(out), "--overwrite"]) == 2
    assert f"no space left on device writing {out}" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(tmpfs) == []


def test_a_full_tmpfs_keeps_the_previous_dataset(tmp_path, tmpfs, capsys):
    small, large = tmp_path / "small.extxyz", tmp_path / "large.extxyz"
    frames = emt_frames(40)
    write(small, frames[:2], format="extxyz")
    write(large, frames, format="extxyz")
    destination = tmpfs / "dataset"
    assert main(["data", "convert", str(small), str(destination), "--task", "s2ef"]) == 0
    before = snapshot(destination)
    fill(tmpfs, leave=64 * 1024)  # room for the record and a shard's first pages, not for 40 structures
    assert main(["data", "convert", str(large), str(destination), "--task", "s2ef", "--overwrite"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("matsciml: error:")]
    assert lines == [f"matsciml: error: no space left on device writing {destination}; free some space and run again"]
    assert snapshot(destination) == before and leftovers(tmpfs) == []


def test_enospc_in_an_lmdb_commit_keeps_the_previous_dataset(tmp_path, monkeypatch, capsys):
    import matsciml.data.formats.lmdb_shards as lmdb_shards

    source = tmp_path / "in.extxyz"
    write(source, emt_frames(2), format="extxyz")
    destination = tmp_path / "dataset"
    assert main(["data", "convert", str(source), str(destination), "--task", "s2ef"]) == 0
    before = snapshot(destination)

    class FullEnvironment:  # LMDB writes in C: the commit, its lowest call Python sees, fails
        def __init__(self, env):
            self._env = env

        def begin(self, *args, **kwargs):
            return FullTransaction(self._env.begin(*args, **kwargs))

        def __getattr__(self, name):
            return getattr(self._env, name)

    class FullTransaction:
        def __init__(self, txn):
            self._txn = txn

        def commit(self):
            self._txn.abort()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._txn, name)

    real = lmdb_shards.open_write
    monkeypatch.setattr(lmdb_shards, "open_write", lambda *a, **k: FullEnvironment(real(*a, **k)))
    assert main(["data", "convert", str(source), str(destination), "--task", "s2ef", "--overwrite"]) == 2
    assert f"no space left on device writing {destination}" in capsys.readouterr().err
    assert snapshot(destination) == before and leftovers(tmp_path) == []


def test_a_full_tmpfs_keeps_the_previous_predictions_file(checkpoint, tmp_path, tmpfs, capsys):
    structures = tmp_path / "in.extxyz"
    write(structures, emt_frames(30, labels=False), format="extxyz")
    out = tmpfs / "out.extxyz"
    first = tmp_path / "first.extxyz"
    write(first, emt_frames(1, labels=False), format="extxyz")
    assert main(["predict-structures", str(checkpoint), str(first), "--out", str(out)]) == 0
    before = out.read_bytes()
    fill(tmpfs, leave=16 * 1024)  # room for the record and a batch, not for 30 structures
    argv = ["predict-structures", str(checkpoint), str(structures), "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 2
    partial = out.with_name(out.name + ".partial")
    assert f"no space left on device writing {partial}" in capsys.readouterr().err
    assert out.read_bytes() == before
    # the partial file is the resume point: cut back to its finished batches, which a rerun continues after
    done = partial.with_name(partial.name + ".done")
    finished = 0 if not done.exists() else json.loads(done.read_text())["bytes"]
    assert partial.stat().st_size == finished if finished else not partial.exists()


def test_a_full_tmpfs_keeps_the_previous_synthetic_devset(tmpfs, capsys):
    # DatasetWriter as a context manager (devset builders): the same rule as data convert
    destination = tmpfs / "synthetic"
    assert main(["devset", "synthetic", str(destination), "--num", "5"]) == 0
    before = snapshot(destination)
    fill(tmpfs, leave=64 * 1024)
    assert main(["devset", "synthetic", str(destination), "--num", "2000", "--overwrite"]) == 2
    assert f"no space left on device writing {destination}" in capsys.readouterr().err
    assert snapshot(destination) == before and leftovers(tmpfs) == []


def test_enospc_in_predict_structures_keeps_the_previous_file_and_the_rerun_completes(
    checkpoint, tmp_path, monkeypatch, capsys
):
    structures, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write(structures, emt_frames(3, labels=False), format="extxyz")
    out.write_bytes(b"an older predictions file\n")
    partial = out.with_name(out.name + ".partial")
    with monkeypatch.context() as patch:
        fill_disk_for(patch, lambda path: path == partial)
        assert main(["predict-structures", str(checkpoint), str(structures), "--out", str(out)]) == 2
    assert f"no space left on device writing {partial}" in capsys.readouterr().err
    assert out.read_bytes() == b"an older predictions file\n" and not partial.exists()  # no batch had finished
    assert main(["predict-structures", str(checkpoint), str(structures), "--out", str(out)]) == 0  # space freed
    from ase.io import read

    assert len(read(out, index=":")) == 3
