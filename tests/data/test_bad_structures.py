"""One rule for bad structures: atoms too close are refused everywhere, isolated atoms pass everywhere.

Data check, convert, loading (data module) and the calculator (tests/test_calculators.py) apply the
same rule, :mod:`matsciml.data.min_distance`; a conversion killed with SIGKILL leaves a partial that
the next conversion removes, closing the dead step's record as INTERRUPTED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from helpers.ase_inputs import emt_frames
from helpers.ready import ReadyPipe

import matsciml
from matsciml.cli import app as cli
from matsciml.data.check import check_dataset
from matsciml.data.convert import convert
from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.errors import DataError
from matsciml.data.min_distance import check_min_distance
from matsciml.data.neighbors import RadiusGraph
from matsciml.records.partials import close_interrupted_record, partial_path, pid_alive
from matsciml.records.provenance import INTERRUPTED, dataset_record, load_record, load_schema

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")

REPO = Path(matsciml.__file__).resolve().parents[1]


def labelled(atoms: Atoms, energy: float = -1.0) -> Atoms:
    """``atoms`` with an energy and zero forces, and no other labels (every frame holds the same fields)."""
    atoms.arrays.pop("relaxed_positions", None)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(atoms), 3)))
    return atoms


def duplicated_atom_frames() -> list[Atoms]:
    """Three labelled slabs; in the second, atom 7 sits 0.02 Å from atom 3."""
    frames = [labelled(atoms.copy()) for atoms in emt_frames(3, labels=False)]
    frames[1].positions[7] = frames[1].positions[3] + [0.02, 0.0, 0.0]
    return frames


def isolated_frames() -> list[Atoms]:
    """A slab, a lone Cu atom without a cell, and an O atom alone in a periodic 20 Å box."""
    slab = labelled(emt_frames(1, labels=False)[0])
    lone = labelled(Atoms("Cu", positions=[[0.0, 0.0, 0.0]], pbc=False), energy=-0.3)
    boxed = labelled(Atoms("O", positions=[[1.0, 2.0, 3.0]], cell=np.eye(3) * 20.0, pbc=True), energy=-0.1)
    return [slab, lone, boxed]


def write_xyz(path: Path, frames: list[Atoms]) -> Path:
    ase.io.write(path, frames, format="extxyz")
    return path


def across_a_cell_face(repeat: int = 1) -> dict[str, np.ndarray]:
    """fcc Cu whose atom 1 sits 0.05 Å from atom 0's periodic image across the x face (far apart inside)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms.positions[1] = atoms.positions[0] + atoms.cell.array[0] - [0.05, 0.0, 0.0]
    return {"positions": atoms.positions, "cell": atoms.cell.array, "pbc": atoms.pbc}


CLOSE = r"atoms 3 and 7 are 0\.02 Å apart, closer than the minimum distance 0\.1 Å"


def test_convert_refuses_duplicated_atoms_naming_file_record_and_atoms(tmp_path, capsys):
    source = write_xyz(tmp_path / "dup.xyz", duplicated_atom_frames())
    for workers in (1, 2):
        with pytest.raises(DataError, match=rf"dup\.xyz, record 1: {CLOSE}") as err:
            convert([source], tmp_path / f"out{workers}", "s2ef", num_workers=workers)
        assert (err.value.source, err.value.record) == (str(source), 1)
        assert not (tmp_path / f"out{workers}").exists()
    # the CLI: one line, exit 2; --min-distance 0 switches the rule off
    command = ["data", "convert", str(source), "--task", "s2ef"]
    assert cli.main([*command, str(tmp_path / "cli")]) == 2
    assert "dup.xyz, record 1: atoms 3 and 7 are 0.02 Å apart" in capsys.readouterr().err
    assert cli.main([*command, str(tmp_path / "off"), "--min-distance", "0"]) == 0


def test_check_and_loading_refuse_duplicated_atoms_with_the_record(tmp_path, capsys):
    # written with the rule off, as an older matsciml or another tool could have written it
    source = write_xyz(tmp_path / "dup.xyz", duplicated_atom_frames())
    dataset = tmp_path / "dup"
    convert([source], dataset, "s2ef", min_distance=0)
    shard = rf"{dataset / 'data.0000.lmdb'}, record 1: {CLOSE}"
    with pytest.raises(DataError, match=shard):
        check_dataset(dataset)
    assert cli.main(["data", "check", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "data.0000.lmdb, record 1: atoms 3 and 7 are 0.02 Å apart" in err and "Traceback" not in err
    assert cli.main(["data", "check", str(dataset), "--min-distance", "0.01"]) == 0
    for representation in ("graph", "point_cloud"):
        datamodule = S2EFDataModule(train_path=dataset, batch_size=3, representation=representation)
        with pytest.raises(DataError, match=shard):
            next(iter(datamodule.train_dataloader()))
    relaxed = S2EFDataModule(train_path=dataset, batch_size=3, min_distance=0.01)
    assert next(iter(relaxed.train_dataloader())).num_structures == 3


@pytest.mark.parametrize("repeat", [1, 4], ids=["4 atoms: every pair", "256 atoms: vesin"])
def test_periodic_images_count(repeat):
    record = across_a_cell_face(repeat)
    message = r"atoms 0 and 1 are 0\.05 Å apart \(periodic image shifted by \[-?1, 0, 0\] cells\)"
    with pytest.raises(ValueError, match=message):
        RadiusGraph(cutoff=6.0)(dict(record))  # from the graph's own neighbour list
    with pytest.raises(ValueError, match=message):
        check_min_distance(**record)  # vesin with cutoff=min_distance (convert, point clouds)
    with pytest.raises(ValueError, match=message):
        RadiusGraph(cutoff=0.04, min_distance=0.1)(dict(record))  # a minimum beyond the cutoff
    without_pbc = {**record, "pbc": np.zeros(3, dtype=bool)}
    check_min_distance(**without_pbc)  # without periodicity the atoms are far apart
    with pytest.raises(ValueError, match="min_distance must be >= 0"):
        RadiusGraph(min_distance=-1.0)


def test_isolated_atoms_pass_convert_check_and_loading(tmp_path):
    source = write_xyz(tmp_path / "isolated.xyz", isolated_frames())
    dataset = tmp_path / "isolated"
    card = convert([source], dataset, "s2ef")
    assert card["num_records"] == 3
    totals = check_dataset(dataset, task="s2ef")
    assert totals["structures"] == 3 and totals["atoms"] == 13 + 1 + 1
    assert cli.main(["data", "check", str(dataset), "--task", "s2ef"]) == 0
    for representation in ("graph", "point_cloud"):
        datamodule = S2EFDataModule(train_path=dataset, batch_size=3, shuffle=False, representation=representation)
        batch = next(iter(datamodule.train_dataloader()))
        assert batch.num_structures == 3 and batch.energy.tolist() == pytest.approx([-1.0, -0.3, -0.1])
        if representation == "graph":
            centres = batch.edge_index[1]
            assert not bool((centres >= 13).any()), "the lone atoms have no edges"
            assert batch.num_edges > 0
    only_lone = tmp_path / "lone"
    convert([write_xyz(tmp_path / "lone.xyz", isolated_frames()[1:])], only_lone, "s2ef")
    batch = next(iter(S2EFDataModule(train_path=only_lone, batch_size=2).train_dataloader()))
    assert batch.num_edges == 0 and batch.edge_index.shape == (2, 0)


def test_pid_alive_tells_dead_from_live():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert pid_alive(os.getpid()) and not pid_alive(process.pid)


def test_a_live_conversions_partial_and_record_are_left_alone(tmp_path):
    destination = tmp_path / "data"
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = partial_path(destination, sleeper.pid)
        live.mkdir()
        record = tmp_path / "data.step.json"
        record.write_text(json.dumps({"status": "RUNNING", "run_id": "live"}))
        assert close_interrupted_record(record, destination) is None
        assert live.is_dir() and json.loads(record.read_text())["status"] == "RUNNING"
    finally:
        sleeper.communicate(b"")


# Reads one frame per unit; after the first shard it signals the test's ready pipe and blocks, so the partial
# exists and the conversion is still running when SIGKILL arrives, however loaded the machine.
_BLOCKING_CONVERT = """
import os, sys, time
from pathlib import Path
from matsciml.cli import app as cli
from matsciml.data.formats import ase_io
ase_io.FRAMES_PER_UNIT = 1
read_unit, calls = ase_io.read_unit, [0]
def blocking_read_unit(unit, task):
    calls[0] += 1
    if calls[0] > 3:
        os.write(int(os.environ["MATSCIML_TEST_READY_FD"]), b"ready\\n")
        time.sleep(600)  # SIGKILL lands here
    return read_unit(unit, task)
ase_io.read_unit = blocking_read_unit
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_killed_conversions_partial_is_removed_and_its_record_interrupted(tmp_path):
    source = write_xyz(tmp_path / "in.xyz", [labelled(a) for a in emt_frames(6, labels=False)])
    destination, ready = tmp_path / "data", ReadyPipe()
    command = ["data", "convert", str(source), str(destination), "--task", "s2ef", "--records-per-shard", "2"]
    env = {**os.environ, **ready.env}
    code = [sys.executable, "-c", _BLOCKING_CONVERT, *command]
    process = subprocess.Popen(code, cwd=REPO, env=env, pass_fds=ready.pass_fds)
    assert ready.wait(process), "the conversion never got past its first shard"
    stale = partial_path(destination, process.pid)
    assert stale.is_dir()
    started = time.perf_counter()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed = load_record(tmp_path / "data.step.json")
    assert killed["status"] == "RUNNING", "a SIGKILLed step cannot close its own record"

    assert cli.main(command) == 0  # the real CLI, in this process
    elapsed = time.perf_counter() - started
    assert not stale.exists() and (destination / "data.0002.lmdb").is_file()
    record = load_record(tmp_path / "data.step.json")
    assert record["status"] == "COMPLETED"
    interrupted = record["links"]["interrupted"]
    assert interrupted["run_id"] == killed["run_id"] and interrupted["pid"] == process.pid
    assert f"process {process.pid} died while writing data" in interrupted["reason"]
    print(f"killed conversion cleaned up and reconverted in {elapsed:.2f} s")


def test_the_dead_record_is_closed_interrupted_before_the_next_step_records(tmp_path):
    destination = tmp_path / "data"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running = dataset_record(destination, "data convert", ["matsciml", "data", "convert"], {})
    running.save()  # as the dead step left it: RUNNING, and its partial
    partial_path(destination, dead.pid).mkdir()
    following = dataset_record(destination, "data convert", ["matsciml", "data", "convert"], {})
    assert following.data["links"]["interrupted"]["run_id"] == running.data["run_id"]
    assert not partial_path(destination, dead.pid).exists()
    closed = load_record(running.path)  # on disk until the following step saves its own record
    jsonschema.validate(closed, load_schema(), format_checker=jsonschema.FormatChecker())
    assert closed["status"] == INTERRUPTED and closed["error"]["type"] == "ProcessDied" and closed["ended_at"]
