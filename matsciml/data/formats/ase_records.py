"""One :class:`ase.Atoms` as a validated matsciml record: geometry, constraints, ids and labels.

Labels come from the calculator's stored results (never a new calculation), else from ``info`` /
``arrays`` under the names in :data:`LABEL_NAMES`; :mod:`matsciml.data.formats.ase_io` has the
rules per input file.
"""

from __future__ import annotations

from os import PathLike

import numpy as np
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.constraints import FixAtoms, FixCartesian
from ase.stress import voigt_6_to_full_3x3_stress

from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.records import Record, validate_record

#: Label field -> ``info`` / ``arrays`` names tried, in order, after the calculator's results.
LABEL_NAMES = {
    K.ENERGY: ("energy", "REF_energy"),
    K.FORCES: ("forces", "REF_forces"),
    K.STRESS: ("stress", "REF_stress"),
    K.RELAXED_ENERGY: ("relaxed_energy", "y_relaxed"),
    K.RELAXED_POSITIONS: ("relaxed_positions", "pos_relaxed"),
    K.INITIAL_ENERGY: ("initial_energy", "y_init"),
}


def atoms_to_record(
    atoms: Atoms,
    task: str | None,
    sid: int | None = None,
    fid: int | None = None,
    source: str | PathLike = "<atoms>",
    index: int | str = 0,
) -> Record:
    """Map one :class:`ase.Atoms` to a validated record (see the module docstring for the rules).

    Args:
        atoms: the structure, with labels in a calculator, ``info`` or ``arrays``.
        task: ``"s2ef"`` or ``"is2re"`` to require that task's targets; ``None`` for geometry only.
        sid: system id used when ``atoms.info["sid"]`` is not an integer (``None``: leave out).
        fid: frame id used when ``atoms.info["fid"]`` is not an integer (``None``: leave out).
        source: file the atoms came from (for error messages).
        index: frame or row of that file (for error messages).

    Raises:
        DataError: a target of ``task`` is missing, or the record fails validation.
    """
    record: dict[str, object] = {
        K.POSITIONS: atoms.positions,
        K.ATOMIC_NUMBERS: atoms.numbers,
        K.CELL: atoms.cell.array,
        K.PBC: atoms.pbc,
        K.TAGS: atoms.get_tags(),
        K.FIXED: _fixed_mask(atoms),
        K.SID: _integer(atoms.info.get("sid"), sid),
        K.FID: _integer(atoms.info.get("fid"), fid),
        **{name: stored_label(atoms, name) for name in LABEL_NAMES},
    }
    record = {name: value for name, value in record.items() if value is not None}
    if K.STRESS in record:
        record[K.STRESS] = _stress(record[K.STRESS])
    missing = [name for name in K.TASK_TARGETS.get(task, ()) if name not in record]
    if missing:
        # bad geometry first: NaN positions also make ASE treat stored results as stale
        validate_record(record, source, index)
        hints = "; ".join(f"{name}: {label_sources(name)}" for name in missing)
        raise DataError(source, f"no {' or '.join(missing)} for task {task} (looked for {hints})", index)
    return validate_record(record, source, index, task=task)


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        # FixCartesian holding only some directions leaves the atom free
        if isinstance(constraint, FixAtoms) or isinstance(constraint, FixCartesian) and constraint.mask.all():
            fixed[constraint.index] = True
    return fixed


def _integer(value: object, default: int | None) -> int | None:
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    return int(value) if is_int else default


def _lookup(atoms: Atoms, names: tuple[str, ...]):
    for name in names:
        if name in atoms.arrays:
            return atoms.arrays[name]
        if name in atoms.info:
            return atoms.info[name]
    return None


def stored_label(atoms: Atoms, name: str):
    """A stored calculator result (never a new calculation), else the first ``LABEL_NAMES`` entry present."""
    if atoms.calc is not None:
        try:
            value = atoms.calc.get_property(name, atoms, allow_calculation=False)
        except PropertyNotImplementedError:
            value = None
        if value is not None:
            return value
    return _lookup(atoms, LABEL_NAMES[name])


def label_sources(name: str) -> str:
    return f"a calculator result, then {' / '.join(LABEL_NAMES[name])} in info or arrays"


def _stress(value) -> np.ndarray:
    stress = np.asarray(value, dtype=np.float64)
    if stress.shape == (6,):  # Voigt order xx yy zz yz xz xy, as ASE calculators store it
        return voigt_6_to_full_3x3_stress(stress)
    return stress.reshape(3, 3) if stress.size == 9 else stress  # other shapes: validate_record names them
