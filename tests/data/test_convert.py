"""``matsciml data convert``: round trips, sharding, determinism, the CLI, atomicity, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from helpers.ase_inputs import (
    assert_record_matches,
    emt_frames,
    read_dataset,
    reference_frames,
    write_inputs,
    write_pymatgen_folder,
)
from helpers.ready import ReadyPipe

import matsciml
from matsciml.cli import app as cli
from matsciml.data.convert import convert
from matsciml.data.errors import DataError
from matsciml.data.formats import ase_io, lmdb_shards

REPO = Path(matsciml.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frames():
    return emt_frames(25)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, frames):
    return write_inputs(tmp_path_factory.mktemp("inputs"), frames)


def stored_items(path: Path) -> list[list[tuple[bytes, bytes]]]:
    items = []
    for shard in lmdb_shards.shard_paths(path):
        env = lmdb_shards.reader(shard)
        with env.begin() as txn:
            items.append(list(txn.cursor().iternext()))
    return items


def leftovers(destination: Path) -> list[Path]:
    return sorted(destination.parent.glob(f".{destination.name}.partial-*"))


def test_extxyz_to_sharded_s2ef_dataset(inputs, tmp_path):
    card = convert([inputs["extxyz"]], tmp_path / "train", "s2ef", records_per_shard=10, title="EMT slabs")
    records, metas, keys = read_dataset(tmp_path / "train")
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "data.0000.lmdb",
        "data.0001.lmdb",
        "data.0002.lmdb",
    ]
    assert [m["shard"]["count"] for m in metas] == [10, 10, 5]
    assert sorted(keys[0], key=int) == [str(i).encode() for i in range(10)]
    assert card == {k: v for k, v in metas[0].items() if k != "shard"}
    assert card["title"] == "EMT slabs" and card["task"] == "s2ef" and card["num_records"] == 25
    assert str(inputs["extxyz"]) in card["source"] and "extxyz" in card["source"]
    reference = reference_frames(inputs["extxyz"], "extxyz")
    for i, (record, atoms) in enumerate(zip(records, reference, strict=True)):
        assert_record_matches(record, atoms)
        assert (int(record["sid"]), int(record["fid"])) == (i, i)  # running sid, frame in file


@pytest.mark.parametrize("kind", ["traj", "db", "json", "aselmdb"])
def test_every_ase_format_converts_exactly(inputs, frames, tmp_path, kind):
    convert([inputs[kind]], tmp_path / kind, "s2ef")
    records, metas, _ = read_dataset(tmp_path / kind)
    assert [m["shard"]["name"] for m in metas] == ["data.0000.lmdb"]  # S2EF default: 10,000 per shard
    for record, atoms in zip(records, frames, strict=True):
        assert_record_matches(record, atoms)  # binary formats keep float64 inputs exactly (to float32)


def test_several_sources_keep_their_order_and_number_sids_across_them(inputs, frames, tmp_path):
    convert([inputs["db"], inputs["extxyz"]], tmp_path / "both", "s2ef", records_per_shard=20)
    records, metas, _ = read_dataset(tmp_path / "both")
    assert [m["shard"]["count"] for m in metas] == [20, 20, 10]
    assert [int(r["sid"]) for r in records] == list(range(50))
    assert [int(r["fid"]) for r in records] == list(range(25)) * 2
    # both hold `frames`; extxyz rounds positions to 8 decimals
    np.testing.assert_allclose(records[25]["positions"], records[0]["positions"], atol=1e-7)


def test_is2re_from_relaxation_trajectories_and_database_rows(inputs, frames, tmp_path):
    relaxations = tmp_path / "relaxations"
    relaxations.mkdir()
    for i in range(3):
        ase.io.write(relaxations / f"system{i}.traj", frames[5 * i : 5 * i + 5])
    card = convert([relaxations, inputs["aselmdb"]], tmp_path / "is2re", "is2re")
    records, metas, _ = read_dataset(tmp_path / "is2re")
    assert [m["shard"]["name"] for m in metas] == ["data.lmdb"] and card["num_records"] == 3 + 25
    for i, record in enumerate(records[:3]):
        first, last = frames[5 * i], frames[5 * i + 4]
        np.testing.assert_array_equal(record["positions"], first.positions.astype(np.float32))
        np.testing.assert_array_equal(record["relaxed_positions"], last.positions.astype(np.float32))
        assert record["relaxed_energy"] == np.float32(last.get_potential_energy())
    for record, atoms in zip(records[3:], frames, strict=True):
        assert record["relaxed_energy"] == np.float32(atoms.info["relaxed_energy"])
    assert "3 files" in card["source"]


@pytest.mark.filterwarnings("ignore:Issues encountered while parsing CIF:UserWarning")
def test_pymatgen_folder_to_is2re(frames, tmp_path):
    paths = write_pymatgen_folder(tmp_path / "cifs", frames[:4])
    card = convert([tmp_path / "cifs"], tmp_path / "out", "is2re", records_per_shard=3)
    records, metas, _ = read_dataset(tmp_path / "out")
    assert [m["shard"]["count"] for m in metas] == [3, 1] and card["num_records"] == 4
    order = sorted(range(4), key=lambda i: paths[i])  # files are read in sorted name order
    expected = [np.float32(frames[i].info["relaxed_energy"]) for i in order]
    assert [r["relaxed_energy"] for r in records] == expected


def test_two_workers_write_the_same_bytes_as_one(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(ase_io, "FRAMES_PER_UNIT", 3)  # many units, so workers finish out of order
    sources = [inputs["extxyz"], inputs["aselmdb"], inputs["traj"]]
    one = convert(sources, tmp_path / "one", "s2ef", records_per_shard=16, num_workers=1, title="t")
    two = convert(sources, tmp_path / "two", "s2ef", records_per_shard=16, num_workers=2, title="t")
    assert one["content_hash"] == two["content_hash"] and one["num_records"] == 75
    assert one == two
    # every stored key and value, metadata included (file pages may hold uninitialised bytes)
    assert stored_items(tmp_path / "one") == stored_items(tmp_path / "two")


def test_failure_in_a_late_record_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ase_io, "FRAMES_PER_UNIT", 4)
    frames = emt_frames(30)
    frames[27].calc = None  # no energy in frame 27, after three shards were written
    path = tmp_path / "late.xyz"
    ase.io.write(path, frames, format="extxyz")
    for workers in (1, 2):
        destination = tmp_path / f"out{workers}"
        with pytest.raises(DataError, match=r"late\.xyz, record 27: no energy") as err:
            convert([path], destination, "s2ef", records_per_shard=5, num_workers=workers)
        assert (err.value.source, err.value.record) == (str(path), 27)
        assert not destination.exists() and leftovers(destination) == []


def test_existing_destination_needs_overwrite(inputs, tmp_path):
    destination = tmp_path / "out"
    convert([inputs["traj"]], destination, "s2ef")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert([inputs["traj"]], destination, "s2ef")
    card = convert([inputs["extxyz"]], destination, "s2ef", records_per_shard=20, overwrite=True)
    assert card["num_shards"] == 2 and len(read_dataset(destination)[0]) == 25


def test_refuses_to_overwrite_its_own_input(inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.xyz").write_bytes(inputs["extxyz"].read_bytes())
    with pytest.raises(DataError, match="inside the destination"):
        convert([folder / "a.xyz"], folder, "s2ef", overwrite=True)
    assert (folder / "a.xyz").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, r"absent\.xyz: no such file or folder"),
        (lambda p: p.with_name("x.pdb").write_text("x"), r"x\.pdb: unknown file type '\.pdb'; supported: "),
        (lambda p: p.write_text(""), r"absent\.xyz: holds no structures"),
    ],
    ids=["missing", "unknown-suffix", "empty"],
)
def test_bad_inputs_raise_one_data_error(tmp_path, setup, message):
    path = tmp_path / "absent.xyz"
    setup(path)
    source = tmp_path / "x.pdb" if "pdb" in message else path
    with pytest.raises(DataError, match=message):
        convert([source], tmp_path / "out", "s2ef")
    assert not (tmp_path / "out").exists()


def test_cli_end_to_end(inputs, tmp_path):
    destination = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "matsciml.cli.app",
            "data",
            "convert",
            str(inputs["extxyz"]),
            str(inputs["db"]),
            str(destination),
            "--task",
            "s2ef",
            "--records-per-shard",
            "30",
            "--title",
            "from cli",
            "--license",
            "CC-BY-4.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records, metas, _ = read_dataset(destination)
    assert len(records) == 50 and [m["shard"]["count"] for m in metas] == [30, 20]
    assert metas[0]["title"] == "from cli" and "data convert" in metas[0]["command"]
    assert metas[0]["license"] == "CC-BY-4.0"
    assert "50/50" in result.stderr  # the progress bar's final state


def test_cli_main_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "frames.pdb"
    bad.write_text("x")
    assert cli.main(["data", "convert", str(bad), str(tmp_path / "out"), "--task", "s2ef"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matsciml: error: ") and "frames.pdb" in err and "unknown file type '.pdb'" in err
    missing = ["data", "convert", str(tmp_path / "nope.xyz"), str(tmp_path / "o"), "--task", "is2re"]
    assert cli.main(missing) == 2
    assert "nope.xyz: no such file or folder" in capsys.readouterr().err


# Reads one frame per unit; once a shard is written it says so through the test's ready pipe and
# then blocks, so the conversion is certainly still running when Ctrl-C arrives, however loaded the machine.
_SLOW_CONVERT = """
import os, sys, time
from pathlib import Path
from matsciml.cli import app as cli
from matsciml.data.formats import ase_io, lmdb_shards
ase_io.FRAMES_PER_UNIT = 1
read_unit = ase_io.read_unit
calls = 0
def blocking_read_unit(unit, task):
    global calls
    calls += 1
    if calls > 6:  # past the first shard of 5 records
        os.write(int(os.environ["MATSCIML_TEST_READY_FD"]), b"ready\\n")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.01)  # Ctrl-C lands here
        raise RuntimeError("no Ctrl-C arrived")
    return read_unit(unit, task)
ase_io.read_unit = blocking_read_unit
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_leaves_no_dataset(inputs, tmp_path):
    destination, ready = tmp_path / "interrupted", ReadyPipe()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_CONVERT,
            "data",
            "convert",
            str(inputs["extxyz"]),
            str(inputs["traj"]),
            str(inputs["db"]),
            str(destination),
            "--task",
            "s2ef",
            "--records-per-shard",
            "5",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ready.env},
        pass_fds=ready.pass_fds,
    )
    assert ready.wait(process), f"the conversion never got past its first shard: {process.communicate()[1][-2000:]}"
    assert leftovers(destination), "a shard is written, so the partial folder must exist"
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not destination.exists() and leftovers(destination) == []
