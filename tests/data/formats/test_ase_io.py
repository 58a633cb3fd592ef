"""Reading ASE / pymatgen inputs into records: field mapping, work units and errors."""

from __future__ import annotations

import importlib.util
import pickle

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from helpers.ase_inputs import (
    assert_record_matches,
    emt_frames,
    reference_frames,
    write_inputs,
    write_pymatgen_folder,
)

from matsciml.data.errors import DataError
from matsciml.data.formats import ase_io
from matsciml.data.formats.ase_io import WorkUnit, atoms_to_record, plan_units, read_unit


def read_all(path, task, frames_per_unit=None):
    return [r for unit in plan_units(path, task, frames_per_unit) for r in read_unit(unit, task)]


@pytest.fixture(scope="module")
def frames():
    return emt_frames(7, seed=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, frames):
    return write_inputs(tmp_path_factory.mktemp("inputs"), frames)


def test_atoms_to_record_maps_every_field(frames):
    atoms = frames[0]
    record = atoms_to_record(atoms, "s2ef", sid=11, fid=4, source="mem", index=0)
    assert_record_matches(record, atoms)
    assert record["fixed"].sum() == 4 and set(record["tags"]) == {0, 1, 2}
    assert (int(record["sid"]), int(record["fid"]), int(record["natoms"])) == (11, 4, len(atoms))
    np.testing.assert_array_equal(record["relaxed_positions"], (atoms.positions + 0.01).astype(np.float32))


def test_integer_ids_in_info_win_over_defaults(frames):
    atoms = frames[0].copy()
    atoms.calc = frames[0].calc
    atoms.info.update(sid=np.int64(42), fid=7)
    record = atoms_to_record(atoms, "s2ef", sid=1, fid=2)
    assert (int(record["sid"]), int(record["fid"])) == (42, 7)
    atoms.info.update(sid="random_123", fid=1.5)  # not integers: the defaults apply
    record = atoms_to_record(atoms, "s2ef", sid=1, fid=None)
    assert int(record["sid"]) == 1 and "fid" not in record


def test_labels_from_info_arrays_and_ref_names(frames, tmp_path):
    source = frames[1]
    energy, forces = source.get_potential_energy(), source.get_forces()
    voigt = source.get_stress()
    atoms = source.copy()  # no calculator: labels only in info / arrays
    atoms.info.update(REF_energy=energy, REF_stress=voigt)
    atoms.new_array("REF_forces", forces)
    path = tmp_path / "ref.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    [record] = read_all(path, "s2ef")
    assert record["energy"] == np.float32(energy)
    np.testing.assert_allclose(record["forces"], forces, atol=1e-7)
    np.testing.assert_allclose(record["stress"], source.get_stress(voigt=False), rtol=1e-6)
    atoms = source.copy()
    atoms.info["energy"] = energy
    atoms.arrays["forces"] = forces
    atoms.info["stress"] = voigt.reshape(2, 3)  # 6 values but not Voigt-shaped: reported as a bad shape
    with pytest.raises(DataError, match="stress must have shape"):
        atoms_to_record(atoms, "s2ef")


@pytest.mark.parametrize("kind", ["extxyz", "traj", "db", "json", "aselmdb"])
def test_each_format_reads_every_frame_exactly(inputs, kind):
    path = inputs[kind]
    records = read_all(path, "s2ef", frames_per_unit=3)
    reference = reference_frames(path, kind)
    assert len(records) == len(reference) == 7
    for fid, (record, atoms) in enumerate(zip(records, reference, strict=True)):
        assert_record_matches(record, atoms)
        assert int(record["fid"]) == fid and "sid" not in record  # the converter numbers sids


def test_db_rows_carry_is2re_targets_from_key_value_pairs_and_data(inputs, frames):
    records = read_all(inputs["aselmdb"], "is2re", frames_per_unit=2)
    for record, atoms in zip(records, frames, strict=True):
        assert record["relaxed_energy"] == np.float32(atoms.info["relaxed_energy"])
        relaxed = atoms.arrays["relaxed_positions"].astype(np.float32)
        np.testing.assert_array_equal(record["relaxed_positions"], relaxed)


def test_extxyz_units_split_at_frame_boundaries(tmp_path):
    frames = emt_frames(25)
    frames[3].set_cell(frames[3].cell * 1.1, scale_atoms=False)  # frames need not look alike
    path = tmp_path / "many.extxyz"
    ase.io.write(path, frames, format="extxyz")
    units = plan_units(path, "s2ef", frames_per_unit=10)
    assert [(u.start, u.stop) for u in units] == [(0, 10), (10, 20), (20, 25)]
    assert units[0].byte_range[0] == 0 and units[-1].byte_range[1] == path.stat().st_size
    records = [r for u in units for r in read_unit(u, "s2ef")]
    for record, atoms in zip(records, ase.io.read(path, ":"), strict=True):
        assert_record_matches(record, atoms)
    assert pickle.loads(pickle.dumps(units[1])) == units[1]  # units travel to worker processes


def test_trajectory_is_one_relaxation_for_is2re(tmp_path):
    frames = emt_frames(4, seed=9)
    path = tmp_path / "relax.traj"
    ase.io.write(path, frames)
    [unit] = plan_units(path, "is2re")
    assert unit.relaxation and unit.num_records == 1
    [record] = read_unit(unit, "is2re")
    first, last = frames[0], frames[-1]
    np.testing.assert_array_equal(record["positions"], first.positions.astype(np.float32))
    np.testing.assert_array_equal(record["relaxed_positions"], last.positions.astype(np.float32))
    assert record["relaxed_energy"] == np.float32(last.get_potential_energy())
    assert record["initial_energy"] == np.float32(first.get_potential_energy())
    # the same file gives one record per frame for S2EF
    assert len(read_all(path, "s2ef")) == 4


# pymatgen snaps CIF fractional coordinates within 1e-4 of "ideal" values and says so
@pytest.mark.filterwarnings("ignore:Issues encountered while parsing CIF:UserWarning")
def test_pymatgen_folder_with_targets(tmp_path, frames):
    folder = tmp_path / "structures"
    paths = write_pymatgen_folder(folder, frames[:4])
    (folder / ".hidden.cif").write_text("not read")
    units = plan_units(folder, "is2re")
    assert [u.path for u in units] == [str(p) for p in sorted(paths)]
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    for unit in units:
        [record] = read_unit(unit, "is2re")
        i = int(unit.path[-2:]) if "POSCAR" in unit.path else int(unit.path[-6:-4])
        reference = AseAtomsAdaptor.get_atoms(Structure.from_file(unit.path))
        np.testing.assert_array_equal(record["positions"], reference.positions.astype(np.float32))
        # pymatgen wraps atoms into the cell: compare fractional coordinates modulo 1
        shift = frames[i].cell.scaled_positions(record["positions"]) - frames[i].get_scaled_positions(False)
        np.testing.assert_allclose(shift - np.round(shift), 0, atol=1e-4)
        np.testing.assert_allclose(record["cell"], frames[i].cell.array, atol=1e-5)
        np.testing.assert_array_equal(record["atomic_numbers"], frames[i].numbers)
        assert record["relaxed_energy"] == np.float32(frames[i].info["relaxed_energy"])
        fixed_in_file = np.isin(np.arange(13), frames[i].constraints[0].index) & ("POSCAR" in unit.path)
        np.testing.assert_array_equal(record["fixed"], fixed_in_file)  # selective dynamics (POSCAR only)


def test_missing_energy_names_file_frame_and_where_to_look(tmp_path):
    frames = emt_frames(3)
    frames[1].calc = None
    path = tmp_path / "partial.xyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"partial\.xyz, record 1: no energy or forces.*REF_energy") as err:
        read_all(path, "s2ef")
    assert (err.value.source, err.value.record) == (str(path), 1)


def test_missing_relaxed_energy_for_is2re(frames):
    atoms = frames[0].copy()
    del atoms.info["relaxed_energy"]
    with pytest.raises(DataError, match="no relaxed_energy.*y_relaxed"):
        atoms_to_record(atoms, "is2re", source="x.xyz", index=5)


def test_nan_position_is_reported_with_its_frame(tmp_path):
    path = tmp_path / "nan.xyz"
    ase.io.write(path, emt_frames(4), format="extxyz")
    lines = path.read_text().splitlines(keepends=True)
    atom_line = 2 * 15 + 2 + 5  # frame 2 (13 atoms + 2 header lines each), atom 5
    columns = lines[atom_line].split()
    columns[2] = "nan"
    lines[atom_line] = " ".join(columns) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=r"nan\.xyz, record 2: positions holds NaN"):
        read_all(path, "s2ef", frames_per_unit=2)


def test_zero_atoms_is_reported(tmp_path):
    from ase import Atoms

    atoms = Atoms(cell=np.eye(3) * 5, pbc=True)
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((0, 3)))
    with pytest.raises(DataError, match="zero atoms"):
        atoms_to_record(atoms, "s2ef", source="empty.traj", index=0)


@pytest.mark.parametrize("name", ["data.csv", "notes.txt", "frames.pdb"])
def test_unknown_file_type_names_suffix_and_supported_ones(tmp_path, name):
    path = tmp_path / name
    path.write_text("1\n")
    supported = r"supported: .*\.aselmdb.*\*\.cif"
    with pytest.raises(DataError, match=rf"unknown file type '{path.suffix}'; {supported}"):
        plan_units(path, "s2ef")


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        plan_units(tmp_path / "absent.xyz", "s2ef")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(DataError, match=r"empty\.xyz: holds no structures"):
        plan_units(tmp_path / "empty.xyz", "s2ef")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="folder holds no structure files"):
        plan_units(tmp_path / "folder", "s2ef")
    (tmp_path / "cut.xyz").write_text("5\ncomment\nCu 0 0 0\n")
    with pytest.raises(DataError, match=r"cut\.xyz, record 0: file ends inside a frame"):
        plan_units(tmp_path / "cut.xyz", "s2ef")
    (tmp_path / "bad.db").write_text("not a database")
    with pytest.raises(DataError, match=r"bad\.db: cannot read as db"):
        plan_units(tmp_path / "bad.db", "s2ef")


def test_aselmdb_without_backend_says_what_to_install(inputs, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ase_db_backends" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"pip install 'matsciml\[aselmdb\]'"):
        plan_units(inputs["aselmdb"], "s2ef")


def test_folder_skips_lock_files_and_rejects_unknown_files(tmp_path, inputs):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.xyz").write_bytes(inputs["extxyz"].read_bytes())
    (folder / "a.aselmdb-lock").write_bytes(b"")
    assert [u.kind for u in plan_units(folder, "s2ef")] == ["extxyz"]
    (folder / "README.md").write_text("hello")
    with pytest.raises(DataError, match=r"README\.md: unknown file type '\.md'"):
        plan_units(folder, "s2ef")


def test_file_kind_dispatch():
    assert ase_io.file_kind("x/POSCAR") == ase_io.file_kind("CONTCAR_3") == "pymatgen"
    assert ase_io.file_kind("a.CIF") == "pymatgen" and ase_io.file_kind("a.ExtXYZ") == "extxyz"
    assert ase_io.file_kind("data.aselmdb") == ase_io.file_kind("a.json") == "db"
    assert WorkUnit("a.traj", "traj", 0, 9, relaxation=True).num_records == 1


def test_relaxation_without_final_energy_names_the_last_frame(tmp_path):
    frames = emt_frames(3)
    frames[-1].calc = None
    path = tmp_path / "unfinished.traj"
    ase.io.write(path, frames)
    with pytest.raises(DataError, match=r"unfinished\.traj, record 2: last frame has no energy"):
        read_all(path, "is2re")
