"""The MD devset (``matsciml devset md``): deterministic, decorrelated, separate trajectories per split."""

import json

import numpy as np
import pytest
from helpers.emt import atoms_from, emt_energy_forces, read_split

from matsciml.cli.app import build_parser, main
from matsciml.data import md_devset
from matsciml.data.datamodules import IS2REDataModule, S2EFDataModule
from matsciml.data.devsets import DEVSET_SPLITS, devset_path
from matsciml.data.formats.card import stale_statistics
from matsciml.data.md_devset import DEFAULT_FRAMES, build_md_devset, frame_correlation, trajectory_plan
from matsciml.data.records import validate_record
from matsciml.records.provenance import load_schema

ELEMENTS = {29, 46, 79}  # Cu, Pd, Au
SMALL = ["--frames-train", "3", "--frames-val", "2", "--frames-test", "2"]


def _build(out, *extra):
    assert main(["devset", "md", "--out", str(out), *SMALL, *extra]) == 0
    return {split: read_split(out / split) for split in DEVSET_SPLITS}


def _hashes(built):
    return {split: cards[0]["content_hash"] for split, (_, cards) in built.items()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("md") / "md"
    return out, _build(out, "--workers", "1")


@pytest.fixture(scope="module")
def shipped():
    return {split: read_split(devset_path("md", split)) for split in DEVSET_SPLITS}


def test_command_builds_the_small_set_and_records_the_step(small):
    out, built = small
    for split, (records, cards) in built.items():
        assert len(records) == int(SMALL[SMALL.index(f"--frames-{split}") + 1]) == cards[0]["num_records"]
        assert cards[0]["task"] == "s2ef" and "EMT" in cards[0]["source"]
    step = json.loads((out.parent / "md.step.json").read_text())
    assert step["status"] == "COMPLETED" and step["step"] == "devset md"
    assert {o["role"]: o["digest"] for o in step["outputs"]} == {
        f"dataset:md/{split}": cards[0]["content_hash"] for split, (_, cards) in built.items()
    }
    assert not [p for p in out.parent.iterdir() if "partial" in p.name]
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
    jsonschema.validate(step, load_schema(), format_checker=jsonschema.FormatChecker())


def test_same_seed_gives_identical_records_for_any_worker_count(small, tmp_path):
    _, built = small
    again = _build(tmp_path / "again", "--workers", "2")
    assert _hashes(again) == _hashes(built)  # sha256 of every key and value: byte-identical records
    for split in DEVSET_SPLITS:
        for first, second in zip(built[split][0], again[split][0], strict=True):
            assert all(np.array_equal(first[key], second[key]) for key in first)


def test_another_seed_gives_other_frames(small, tmp_path):
    _, built = small
    other = _hashes(_build(tmp_path / "other", "--seed", "1", "--workers", "1"))
    assert all(other[split] != digest for split, digest in _hashes(built).items())


def test_existing_output_is_refused_and_a_failed_build_leaves_the_old_one(small, monkeypatch, capsys):
    out, built = small
    assert main(["devset", "md", "--out", str(out), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err

    def crash(seed, sid, num_frames):
        raise RuntimeError("EMT crashed")

    monkeypatch.setattr(md_devset, "md_trajectory", crash)
    with pytest.raises(RuntimeError, match="EMT crashed"):
        build_md_devset(out, overwrite=True, frames={"train": 3}, workers=1, progress=False)
    assert _hashes({split: read_split(out / split) for split in DEVSET_SPLITS}) == _hashes(built)
    assert not [p for p in out.parent.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("frames, match", [({"train": 0}, "positive integer"), ({"training": 5}, "unknown splits")])
def test_bad_frame_counts_are_rejected_before_any_work(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        build_md_devset(tmp_path / "md", frames=frames, progress=False)
    assert not list(tmp_path.iterdir())


def test_trajectories_are_split_evenly_and_never_shared():
    plan = trajectory_plan(DEFAULT_FRAMES)
    by_split = {split: [(sid, n) for s, sid, n in plan if s == split] for split in DEVSET_SPLITS}
    assert [n for _, n in by_split["train"]] == [26] * 5
    assert [n for _, n in by_split["val"]] == [15, 15] and [n for _, n in by_split["test"]] == [25, 25]
    sids = [sid for _, sid, _ in plan]
    assert sids == sorted(set(sids))


def test_cli_defaults_are_the_builder_defaults(capsys):
    args = build_parser().parse_args(["devset", "md"])
    assert {split: getattr(args, f"frames_{split}") for split in DEFAULT_FRAMES} == DEFAULT_FRAMES
    with pytest.raises(SystemExit):
        build_parser().parse_args(["devset", "md", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for split, count in DEFAULT_FRAMES.items():
        assert f"--frames-{split} FRAMES_{split.upper()} frames (default: {count})" in text


def test_shipped_set_has_its_sizes_cards_and_free_bulk_atoms(shipped):
    for split, (records, cards) in shipped.items():
        assert len(records) == DEFAULT_FRAMES[split] == cards[0]["num_records"]
        assert cards[0]["num_shards"] == len(cards) and not stale_statistics(cards[0])
        assert cards[0]["num_fixed_atoms"] == 0 and cards[0]["num_atoms"] == 80 * len(records)
        for index, record in enumerate(records):
            validate_record(record, devset_path("md", split), index, task="s2ef")
            cell = record["cell"]
            assert np.allclose(cell, np.diag(np.diag(cell))) and record["pbc"].all()  # cubic, 3D periodic
            assert not record["fixed"].any() and not record["tags"].any()
            fractional = record["positions"] @ np.linalg.inv(cell)
            assert fractional.min() > -1e-5 and fractional.max() < 1 + 1e-5  # wrapped into the cell


def test_shipped_splits_share_no_trajectory_and_each_has_every_element(shipped):
    sids = [{int(r["sid"]) for r in shipped[split][0]} for split in DEVSET_SPLITS]
    assert sum(map(len, sids)) == len(set().union(*sids))
    for records, cards in shipped.values():
        assert {int(z) for r in records for z in r["atomic_numbers"]} == ELEMENTS
        assert {int(z) for z in cards[0]["elements"]} == ELEMENTS


def test_shipped_frames_are_decorrelated_and_diffusing(shipped):
    records = shipped["train"][0]
    assert frame_correlation(records[:1] * 2)["force_correlation"] == pytest.approx(1.0)  # a frame with itself
    measured = frame_correlation(records)
    assert measured["pairs"] == len(records) - 5  # five trajectories
    assert abs(measured["force_correlation"]) < 0.2  # 0.05 when shipped
    assert measured["rms_displacement"] > 0.4  # Å per 160 fs: a liquid, not a vibrating crystal


def test_shipped_labels_are_what_emt_computes(shipped):
    for record in shipped["test"][0][::10]:
        energy, forces = emt_energy_forces(atoms_from(record))
        np.testing.assert_allclose(record["energy"], energy, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(record["forces"], forces, rtol=1e-5, atol=1e-5)


def test_shipped_set_passes_data_check(capsys):
    assert main(["data", "check", "--devset", "md/test", "--task", "s2ef", "--cutoff", "5"]) == 0
    assert "50" in capsys.readouterr().out


def test_data_module_loads_the_md_devset_and_builds_graphs():
    datamodule = S2EFDataModule.from_devset(devset="md", batch_size=5, shuffle=False, cutoff=5.0)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.num_structures == 5 and batch.num_atoms == 400
    assert 20 < batch.num_edges / batch.num_atoms < 40  # neighbours within 5 Å in the liquid
    assert datamodule.paths["train"] == str(devset_path("md", "train"))
    plain = S2EFDataModule(train_path=devset_path("md", "train"), batch_size=5, shuffle=False, cutoff=5.0)
    plain.setup("fit")
    assert next(iter(plain.train_dataloader())).num_edges == batch.num_edges


def test_from_devset_refuses_another_tasks_devset():
    with pytest.raises(ValueError, match="holds s2ef records"):
        IS2REDataModule.from_devset(devset="md")
    with pytest.raises(ValueError, match="unknown devset"):
        S2EFDataModule.from_devset(devset="liquid")
