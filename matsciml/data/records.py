"""Checking and normalising one structure record (a ``dict`` of numpy arrays).

Every reader passes its records through :func:`validate_record`, so a bad structure is
reported once, with its file and record number, before it reaches numpy or a model.
"""

from __future__ import annotations

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
    and ``fixed`` to False, and ``pbc`` defaults to all-periodic.

    Args:
        record: field name -> array-like.
        source: file the record came from (for error messages).
        index: record key or number in that file (for error messages).
        task: ``"s2ef"`` or ``"is2re"`` to also require that task's targets.
    """

    def fail(message: str) -> DataError:
        return DataError(source, message, index)

    required = K.REQUIRED[:-1] + tuple(K.TASK_TARGETS.get(task, ())) if task else K.REQUIRED[:-1]
    if task is not None and task not in K.TASK_TARGETS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(K.TASK_TARGETS)}")
    missing = [name for name in required if record.get(name) is None]
    if missing:
        raise fail(f"missing required field(s) {missing}; present: {sorted(record)}")

    out: Record = {}
    for name, value in record.items():
        field = K.FIELDS.get(name)
        if field is None or field.level not in ("atom", "structure") or value is None:
            continue
        try:
            array = np.asarray(value)
            if field.dtype is np.bool_:
                array = array.astype(np.bool_)
            elif np.issubdtype(field.dtype, np.integer):
                if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                    raise fail(f"{name} holds NaN or inf where integers are expected")
                array = np.rint(array).astype(field.dtype) if array.dtype.kind == "f" else array.astype(
                    field.dtype
                )
            else:
                array = array.astype(field.dtype, copy=False)
        except (TypeError, ValueError) as err:
            if isinstance(err, DataError):
                raise
            raise fail(f"{name} cannot be read as {np.dtype(field.dtype).name}: {err}") from None
        out[name] = array

    positions = out[K.POSITIONS]
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise fail(f"positions must have shape (num_atoms, 3), got {positions.shape}")
    natoms = positions.shape[0]
    if natoms == 0:
        raise fail("structure has zero atoms")
    out.setdefault(K.PBC, np.ones(3, dtype=np.bool_))
    out.setdefault(K.CELL, np.zeros((3, 3), dtype=np.float32))
    out.setdefault(K.TAGS, np.zeros(natoms, dtype=np.int64))
    out.setdefault(K.FIXED, np.zeros(natoms, dtype=np.bool_))
    if K.NATOMS in out and int(out[K.NATOMS].reshape(-1)[0]) != natoms:
        raise fail(f"natoms is {int(out[K.NATOMS].reshape(-1)[0])} but positions hold {natoms} atoms")
    out[K.NATOMS] = np.asarray(natoms, dtype=np.int64)

    for name, array in list(out.items()):
        expected = tuple(natoms if s == "N" else s for s in K.FIELDS[name].shape)
        if array.shape != expected:
            if array.size == int(np.prod(expected)) and array.ndim != len(expected):
                out[name] = array = array.reshape(expected)  # e.g. OC20 cell (1, 3, 3), y as (1,)
            else:
                raise fail(f"{name} must have shape {_shape_text(name)}, got {array.shape}")
        if K.FIELDS[name].is_float and not np.all(np.isfinite(array)):
            raise fail(f"{name} holds NaN or inf")

    numbers = out[K.ATOMIC_NUMBERS]
    if numbers.min() < 1 or numbers.max() > 118:
        raise fail(f"atomic numbers must lie in 1..118, got {numbers.min()}..{numbers.max()}")
    pbc = out[K.PBC]
    if pbc.any() and abs(np.linalg.det(out[K.CELL].astype(np.float64)[pbc][:, pbc] @
                                       out[K.CELL].astype(np.float64)[pbc][:, pbc].T)) < 1e-12:
        raise fail("cell is degenerate along a periodic direction")
    return out


def _shape_text(name: str) -> str:
    shape = K.FIELDS[name].shape
    return "(" + ", ".join("num_atoms" if s == "N" else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
