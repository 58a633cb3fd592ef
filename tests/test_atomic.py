"""Replacing a dataset or a package never leaves a moment with neither the old nor the new one."""

import shutil

import pytest

from matsciml import atomic
from matsciml.data.synthetic import write_synthetic

pytestmark = pytest.mark.skipif(
    atomic._libc() is None, reason="renameat2 exchange is Linux-only (elsewhere the documented fallback runs)"
)


def test_folders_are_exchanged_in_one_step(tmp_path):
    old, new = tmp_path / "data", tmp_path / ".data.tmp"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    assert atomic.exchange(new, old)
    assert (old / "b").read_text() == "new" and (new / "a").read_text() == "old"
    atomic.replace_path(old, tmp_path / "file")  # to a path that does not exist: a plain rename
    assert (tmp_path / "file" / "b").is_file() and not old.exists()


def test_overwriting_a_dataset_always_leaves_one_in_place(tmp_path, monkeypatch):
    destination = tmp_path / "data"
    write_synthetic(destination, num_structures=4, records_per_shard=2, seed=0)
    before = sorted(p.name for p in destination.iterdir())
    real_rmtree = shutil.rmtree
    removed = []

    def watched(path, *args, **kwargs):  # whatever is deleted, a complete dataset stays at destination
        real_rmtree(path, *args, **kwargs)
        removed.append(path)
        assert destination.is_dir() and sorted(p.name for p in destination.iterdir()) == before

    monkeypatch.setattr(shutil, "rmtree", watched)
    write_synthetic(destination, num_structures=4, records_per_shard=2, seed=1, overwrite=True)
    assert removed and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
