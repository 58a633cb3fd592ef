"""Checking and normalising one structure record (a ``dict`` of numpy arrays).

Every reader passes its records through :func:`validate_record`, so a bad structure is
reported once, with its file and record number, before it reaches numpy or a model.
Records of matsciml's own format were normalised when written and only need
:func:`check_stored_record`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from os import PathLike

import numpy as np

from matsciml.data import keys as K
from matsciml.data.errors import DataError

Record = dict[str, np.ndarray]


def validate_record(
    record: Mapping[str, object],
    source: str | PathLike,
    index: int | str,
    task: str | None = None,
) -> Record:
    """Return ``record`` with declared dtypes and shapes, or raise :class:`DataError`.

    Unknown keys are dropped. ``natoms`` is filled in when missing, ``tags`` default to 0
    and ``fixed`` to False, ``pbc`` to all-periodic and ``cell`` to zeros.

    Args:
        record: field name -> array-like.
        source: file the record came from (for error messages).
        index: record key or number in that file (for error messages).
        task: ``"s2ef"`` or ``"is2re"`` to also require that task's targets.
    """
    _require(record, source, index, task)
    out: Record = {}
    for name, value in record.items():
        field = K.FIELDS.get(name)
        if field is None or field.level not in ("atom", "structure") or value is None:
            continue
        out[name] = _cast(name, value, field, source, index)

    positions = out[K.POSITIONS]
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise DataError(source, f"positions must have shape (num_atoms, 3), got {positions.shape}", index)
    natoms = positions.shape[0]
    if K.NATOMS in out and out[K.NATOMS].size == 1 and int(out[K.NATOMS].reshape(-1)[0]) != natoms:
        raise DataError(
            source, f"natoms is {int(out[K.NATOMS].reshape(-1)[0])} but positions hold {natoms} atoms", index
        )
    out[K.NATOMS] = np.asarray(natoms, dtype=np.int64)
    out.setdefault(K.PBC, np.ones(3, dtype=np.bool_))
    out.setdefault(K.CELL, np.zeros((3, 3), dtype=np.float32))
    out.setdefault(K.TAGS, np.zeros(natoms, dtype=np.int64))
    out.setdefault(K.FIXED, np.zeros(natoms, dtype=np.bool_))
    for name, array in out.items():
        expected = _expected_shape(name, natoms)
        if array.shape != expected and array.size == int(np.prod(expected)) and natoms > 0:
            out[name] = array.reshape(expected)  # e.g. OC20's cell (1, 3, 3) or y as (1,)
    return _check(out, source, index)


def check_stored_record(record: Record, source: str | PathLike, index: int | str, task: str | None) -> Record:
    """Check a record of matsciml's own format without converting it.

    :class:`~matsciml.data.formats.store.DatasetWriter` normalised it when writing; this
    makes sure it suits ``task`` and was not damaged since.
    """
    _require(record, source, index, task)
    return _check(record, source, index)


def _require(record: Mapping[str, object], source, index, task: str | None) -> None:
    if task is not None and task not in K.TASK_TARGETS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(K.TASK_TARGETS)}")
    required = (*K.REQUIRED, *K.TASK_TARGETS.get(task, ()))
    missing = [name for name in required if record.get(name) is None]
    if missing:
        raise DataError(source, f"missing required field(s) {missing}; present: {sorted(record)}", index)


def _cast(name: str, value: object, field: K.Field, source, index) -> np.ndarray:
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"values of kind {array.dtype} are not numbers")
        if np.issubdtype(field.dtype, np.integer) and array.dtype.kind == "f":
            if not np.all(np.isfinite(array)):
                raise DataError(source, f"{name} holds NaN or inf where integers are expected", index)
            return np.rint(array).astype(field.dtype)  # OC20 stores atomic numbers as floats
        return array.astype(field.dtype, copy=False)
    except (TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(source, f"{name} cannot be read as {np.dtype(field.dtype).name}: {err}", index) from None


def _expected_shape(name: str, natoms: int) -> tuple[int, ...]:
    return tuple(natoms if s == "N" else s for s in K.FIELDS[name].shape)


def _check(record: Record, source, index) -> Record:
    natoms = record[K.POSITIONS].shape[0] if record[K.POSITIONS].ndim == 2 else -1
    if natoms == 0:
        raise DataError(source, "structure has zero atoms", index)
    for name, array in record.items():
        field = K.FIELDS[name]
        shape = array.shape
        # fast path for the common shapes, the general rule otherwise
        ok = (
            shape == (natoms, 3)
            if field.shape == ("N", 3)
            else (shape == (natoms,) if field.shape == ("N",) else shape == field.shape)
        )
        if not ok and shape != _expected_shape(name, natoms):
            raise DataError(source, f"{name} must have shape {_shape_text(name)}, got {array.shape}", index)
        # a sum is finite exactly when every term is (float32 data cannot overflow it here)
        if field.is_float and not math.isfinite(float(array.sum(dtype=np.float64))):
            raise DataError(source, f"{name} holds NaN or inf", index)
    numbers = record[K.ATOMIC_NUMBERS]
    if numbers.min() < 1 or numbers.max() > 118:
        raise DataError(source, f"atomic numbers must lie in 1..118, got {numbers.min()}..{numbers.max()}", index)
    if _periodic_span(record[K.CELL], record[K.PBC]) < 1e-6:
        raise DataError(source, "cell is degenerate along a periodic direction", index)
    return record


def _periodic_span(cell: np.ndarray, pbc: np.ndarray) -> float:
    """Length, area or volume spanned by the periodic lattice vectors (1.0 if none).

    Plain Python on a 3x3 list: numpy's det or SVD would cost more than the rest of the check.
    """
    rows = [row for row, periodic in zip(cell.tolist(), pbc.tolist(), strict=True) if periodic]
    if not rows:
        return 1.0
    if len(rows) == 1:
        return sum(x * x for x in rows[0]) ** 0.5
    (a1, a2, a3), (b1, b2, b3) = rows[0], rows[1]
    cross = (a2 * b3 - a3 * b2, a3 * b1 - a1 * b3, a1 * b2 - a2 * b1)
    if len(rows) == 2:
        return sum(x * x for x in cross) ** 0.5
    return abs(sum(x * y for x, y in zip(cross, rows[2], strict=True)))


def _shape_text(name: str) -> str:
    shape = ["num_atoms" if s == "N" else str(s) for s in K.FIELDS[name].shape]
    return "(" + ", ".join(shape) + ("," if len(shape) == 1 else "") + ")"
