"""Reading structures from ASE and pymatgen files as matsciml records.

Inputs, by file name: ``.xyz`` / ``.extxyz`` (extended XYZ), ``.traj`` (ASE trajectory),
``.db`` (SQLite) / ``.json`` / ``.aselmdb`` (ASE databases; ``.aselmdb`` is fairchem's LMDB
backend and needs ``pip install 'matsciml[aselmdb]'``), pymatgen structure files (``*.cif``,
``POSCAR*``, ``CONTCAR*``, ``*.vasp``, ``vasprun*.xml``, ...), and folders: every file beneath
one, in sorted path order (hidden files and database lock files skipped).

Fields (:func:`~matsciml.data.formats.ase_records.atoms_to_record`): geometry, ``tags``
(``atoms.get_tags()``) and ``fixed`` (``FixAtoms``, or ``FixCartesian`` on all three
directions); labels from the calculator's stored results (never a new calculation), else from
``info`` / ``arrays`` under the names in ``ase_records.LABEL_NAMES`` (``energy``, then
MACE-style ``REF_energy``, ...). Stress may be Voigt 6 or 3x3, eV/Å^3. ``sid`` / ``fid`` come
from integer ``info["sid"]`` / ``info["fid"]``, else ``fid`` is the frame's position in its file
and the converter numbers ``sid``. Database rows' ``key_value_pairs`` and ``data`` are read like
``info``.

IS2RE targets, one rule per input kind:

* an ASE ``.traj`` file is **one relaxation**: the first frame is the initial structure (with
  its own labels; its energy also becomes ``initial_energy``), the last frame's energy becomes
  ``relaxed_energy`` (as stored, usually a total energy) and its positions ``relaxed_positions``;
* any other input gives one record per frame or row, which must carry ``relaxed_energy`` (or
  OC20's ``y_relaxed``), optionally ``relaxed_positions`` / ``pos_relaxed`` and ``initial_energy``
  / ``y_init``;
* a folder of pymatgen files may hold ``id_prop.csv`` (CGCNN layout, ``name,value`` rows with the
  file name or its stem): the value becomes ``relaxed_energy`` (is2re) or ``energy`` (s2ef).

Reading is split into picklable :class:`WorkUnit` s (a file, or a slice of its frames or rows)
that worker processes can read independently while records are still written in input order.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from os import PathLike
from pathlib import Path

import numpy as np
from ase import Atoms

from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.formats.ase_records import atoms_to_record, label_sources, stored_label
from matsciml.data.records import Record

#: File suffix -> reader, for ASE formats.
ASE_SUFFIXES = {".xyz": "extxyz", ".extxyz": "extxyz", ".traj": "traj", ".db": "db", ".json": "db", ".aselmdb": "db"}
#: File-name patterns (case-insensitive) read with pymatgen's ``Structure.from_file``.
PYMATGEN_PATTERNS = (
    "*.cif",
    "*.mcif",
    "POSCAR*",
    "CONTCAR*",
    "*.vasp",
    "*.poscar",
    "vasprun*.xml*",
    "*.cssr",
    "*.xsf",
    "*.res",
)
#: Frames (or rows) per work unit: large enough to amortise opening a file, small enough to balance.
FRAMES_PER_UNIT = 256
TARGETS_FILE = "id_prop.csv"


@dataclass(frozen=True)
class WorkUnit:
    """A piece of reading a worker process can do on its own.

    Args:
        path: the file to read.
        kind: ``"extxyz"``, ``"traj"``, ``"db"`` or ``"pymatgen"``.
        start: position of the first frame (or database row) in the file.
        stop: one past the last frame.
        byte_range: extxyz only: the bytes of the file holding frames ``start:stop``.
        relaxation: the whole ``.traj`` file is one IS2RE relaxation (one record).
        target: pymatgen only: the value from the folder's ``id_prop.csv``.
    """

    path: str
    kind: str
    start: int = 0
    stop: int = 1
    byte_range: tuple[int, int] | None = None
    relaxation: bool = False
    target: float | None = None

    @property
    def num_records(self) -> int:
        return 1 if self.relaxation else self.stop - self.start


SUPPORTED = ", ".join([*sorted(ASE_SUFFIXES), *PYMATGEN_PATTERNS]) + " or a folder"


def file_kind(path: str | PathLike) -> str:
    """The reader for ``path`` (``extxyz``, ``traj``, ``db`` or ``pymatgen``), by its name.

    Raises:
        DataError: the file type is not supported.
    """
    path = Path(path)
    if kind := ASE_SUFFIXES.get(path.suffix.lower()):
        return kind
    if any(fnmatch(path.name.lower(), pattern.lower()) for pattern in PYMATGEN_PATTERNS):
        return "pymatgen"
    raise DataError(path, f"unknown file type {path.suffix or path.name!r}; supported: {SUPPORTED}")


def plan_units(source: str | PathLike, task: str, frames_per_unit: int | None = None) -> list[WorkUnit]:
    """Split one input into work units, in reading order.

    Args:
        source: a file or folder.
        task: ``"s2ef"`` or ``"is2re"`` (for IS2RE a ``.traj`` file is one unit, one relaxation).
        frames_per_unit: frames or rows per unit (default :data:`FRAMES_PER_UNIT`).

    Raises:
        DataError: the path is missing, of an unknown type, or holds no structures.
    """
    source = Path(source)
    per_unit = frames_per_unit or FRAMES_PER_UNIT
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not _skipped(p.relative_to(source)))
        if not files:
            raise DataError(source, f"folder holds no structure files (supported: {SUPPORTED})")
    elif source.is_file():
        files = [source]
    else:
        raise DataError(source, "no such file or folder")
    targets: dict[Path, dict[str, float]] = {}  # id_prop.csv of each folder, read once
    units = []
    for path in files:
        if file_kind(path) == "pymatgen":
            if path.parent not in targets:
                targets[path.parent] = _folder_targets(path.parent)
            units.append(WorkUnit(str(path), "pymatgen", target=targets[path.parent].get(path.name)))
        else:
            units.extend(_file_units(path, task, per_unit))
    return units


def _skipped(relative: Path) -> bool:
    name = relative.name
    return (
        any(part.startswith(".") for part in relative.parts)
        or name == TARGETS_FILE
        or name.endswith(("-lock", ".lock"))
    )  # database lock files sit beside the data


def _file_units(path: Path, task: str, per_unit: int) -> list[WorkUnit]:
    kind, offsets = file_kind(path), None
    try:
        if kind == "extxyz":
            offsets = _extxyz_offsets(path)
            count = len(offsets) - 1
        elif kind == "traj":
            from ase.io import Trajectory

            with Trajectory(str(path)) as traj:
                count = len(traj)
            if task == "is2re" and count:
                return [WorkUnit(str(path), kind, 0, count, relaxation=True)]
        else:
            count = len(_connect(path))
    except DataError:
        raise
    except Exception as err:  # any parser's complaint becomes one error naming the file
        raise DataError(path, f"cannot read as {kind}: {err}") from None
    if count == 0:
        raise DataError(path, "holds no structures")
    stops = [min(start + per_unit, count) for start in range(0, count, per_unit)]
    return [
        WorkUnit(str(path), kind, start, stop, offsets and (offsets[start], offsets[stop]))
        for start, stop in zip(range(0, count, per_unit), stops, strict=True)
    ]


def _extxyz_offsets(path: Path) -> list[int]:
    """Byte offset of every frame, then of the end: found as ASE's reader does, so units read only theirs."""
    starts: list[int] = []
    with open(path, "rb") as f:
        while True:  # ends at the end of the file or the first blank line
            position, line = f.tell(), f.readline()
            if not line.strip():  # ASE also stops at the first blank line
                return [*starts, position]
            if not line.strip().isdigit():
                raise DataError(path, f"expected an atom count line, got {line[:40]!r}", len(starts))
            natoms = int(line)
            head = []  # the comment line and the first atom's
            for _ in range(natoms + 1):  # the comment line, then one per atom: never more lines than the file has
                text = f.readline()
                if not text:
                    raise DataError(path, f"file ends inside a frame of {natoms} atoms", len(starts))
                if len(head) < 2:
                    head.append(text)
            if natoms:
                _check_columns(path, len(starts), *head)
            while True:  # optional VEC1..VEC3 cell lines
                mark = f.tell()
                if not f.readline().lstrip().startswith(b"VEC"):
                    f.seek(mark)
                    break
            starts.append(position)


def _check_columns(path: Path, frame: int, comment: bytes, first_atom: bytes) -> None:
    """Refuse a ``Properties`` header declaring more columns than the atom lines hold.

    ASE builds a dtype of every declared column before it reads a value: ``forces:R:99999999`` in a
    comment line would cost gigabytes and minutes. The comment is parsed with ASE's own parser, so
    this sees exactly what ASE would; anything it cannot parse is left for ASE to report.
    """
    if b"Properties" not in comment:
        return
    from ase.io.extxyz import key_val_str_to_dict

    try:
        spec = key_val_str_to_dict(comment.decode().strip()).get("Properties")
        declared = sum(int(count) for count in spec.split(":")[2::3])
    except Exception:  # malformed: ASE's reader raises its own error for it
        return
    present = len(first_atom.split())
    if declared > present:
        raise DataError(
            path, f"Properties declares {declared} columns per atom, the first atom line holds {present}", frame
        )


def _folder_targets(folder: Path) -> dict[str, float]:
    """``id_prop.csv`` of a folder as ``file name -> value`` (stems too), or ``{}``."""
    table = folder / TARGETS_FILE
    if not table.is_file():
        return {}
    names, targets = {p.stem: p.name for p in folder.iterdir()}, {}
    with open(table, newline="") as f:
        for line_number, row in enumerate(csv.reader(f), start=1):
            try:
                targets[names.get(row[0].strip(), row[0].strip())] = float(row[1])
            except (IndexError, ValueError):
                raise DataError(table, f"expected 'name,value', got {row}", line_number) from None
    return targets


def _connect(path: Path):
    import ase.db

    if path.suffix.lower() == ".aselmdb":
        if importlib.util.find_spec("ase_db_backends") is None:
            raise DataError(
                path, "reading .aselmdb files needs the ase-db-backends package: pip install 'matsciml[aselmdb]'"
            )
        return ase.db.connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
    return ase.db.connect(str(path), use_lock_file=False)


# -- reading --------------------------------------------------------------------------------


def read_unit(unit: WorkUnit, task: str | None) -> list[Record]:
    """Read one work unit into validated records (``sid`` is left out when the input has none).

    Args:
        unit: from :func:`plan_units`.
        task: ``"s2ef"`` or ``"is2re"`` to require that task's targets; ``None`` for geometry only.

    Raises:
        DataError: a frame cannot be read, lacks the task's targets, or fails validation.
    """
    where = unit.start if unit.num_records == 1 else f"{unit.start}..{unit.stop - 1}"
    try:
        if unit.relaxation:
            return [_relaxation_record(unit, task)]
        return [atoms_to_record(atoms, task, None, fid, unit.path, label) for fid, label, atoms in _frames(unit, task)]
    except DataError:
        raise
    except Exception as err:
        raise DataError(unit.path, f"cannot read as {unit.kind}: {err}", where) from None


def _frames(unit: WorkUnit, task: str | None) -> Iterator[tuple[int, int | str, Atoms]]:
    """Yield ``(position in file, label for messages, atoms)`` for each frame of the unit."""
    if unit.kind == "extxyz":
        import ase.io

        with open(unit.path, "rb") as f:
            f.seek(unit.byte_range[0])
            text = f.read(unit.byte_range[1] - unit.byte_range[0]).decode()
        for i, atoms in enumerate(ase.io.read(io.StringIO(text), index=":", format="extxyz"), unit.start):
            yield i, i, atoms
    elif unit.kind == "traj":
        from ase.io import Trajectory

        with Trajectory(unit.path) as traj:
            for i in range(unit.start, unit.stop):
                yield i, i, traj[i]
    elif unit.kind == "db":
        db = _connect(Path(unit.path))
        if hasattr(db, "ids"):  # aselmdb: direct lookups; its select() decodes every row
            rows = (db.get(id=i) for i in db.ids[unit.start : unit.stop])
        else:
            rows = db.select(sort="id", offset=unit.start, limit=unit.stop - unit.start)
        for i, row in enumerate(rows, unit.start):
            atoms = row.toatoms()
            atoms.info.update({**row.key_value_pairs, **(row.get("data") or {})})
            yield i, f"id {row.id}", atoms
    else:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        atoms = AseAtomsAdaptor.get_atoms(Structure.from_file(unit.path))
        if unit.target is not None:
            atoms.info[K.RELAXED_ENERGY if task == "is2re" else K.ENERGY] = unit.target
        yield 0, 0, atoms


def _relaxation_record(unit: WorkUnit, task: str | None) -> Record:
    from ase.io import Trajectory

    with Trajectory(unit.path) as traj:
        first, last, end = traj[0], traj[len(traj) - 1], len(traj) - 1
    if not np.array_equal(first.numbers, last.numbers):
        raise DataError(unit.path, "first and last frames hold different atoms; not one relaxation", end)
    if (relaxed_energy := stored_label(last, K.ENERGY)) is None:
        raise DataError(unit.path, f"last frame has no energy (looked for {label_sources(K.ENERGY)})", end)
    first.info[K.RELAXED_ENERGY] = relaxed_energy
    first.new_array(K.RELAXED_POSITIONS, last.positions)
    if (initial_energy := stored_label(first, K.ENERGY)) is not None:
        first.info[K.INITIAL_ENERGY] = initial_energy
    return atoms_to_record(first, task, None, 0, unit.path, 0)
