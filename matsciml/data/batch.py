"""The batch container for many structures, and the collate that builds it.

Every field a batch can hold is declared once in :mod:`matsciml.data.keys`; this module
turns that declaration into attributes (``batch.positions``, ``batch.forces``, ...) and
into the collation rules. A declared field that a batch does not carry reads as ``None``;
an undeclared name is an ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView

import numpy as np
import torch

from matsciml.data import keys as K


class Batch(Mapping):
    """Structures batched as flat, concatenated tensors (the PyG layout).

    Atoms of all structures are concatenated (``N`` in total), edges likewise (``E``),
    and per-structure fields are stacked (``B`` structures). ``structure_index`` maps
    each atom to its structure and ``ptr[b]:ptr[b + 1]`` slices structure ``b``'s atoms.
    Field shapes and units are listed in :data:`matsciml.data.keys.FIELDS` and on each
    attribute's docstring (``help(Batch.forces)``).

    A batch is a ``Mapping`` from field names to tensors, and ``type(batch)(mapping)``
    rebuilds one: that is how Lightning's ``apply_to_collection`` walks it, so the Trainer's
    dtype conversion (``precision="64-true"``) and device transfer reach every tensor.
    Equality and hashing stay by identity (comparing tensors elementwise has no single answer).

    Args:
        fields: a mapping of declared field names to tensors (what ``apply_to_collection`` passes).
        **more: tensors keyed by declared field names.
    """

    __slots__ = ("_data",)
    __eq__ = object.__eq__  # Mapping compares contents, which for tensors raises
    __hash__ = object.__hash__

    def __init__(self, fields: Mapping[str, torch.Tensor] | None = None, /, **more: torch.Tensor):
        data = {**(fields or {}), **more}
        unknown = set(data) - set(K.FIELDS)
        if unknown:
            raise KeyError(f"undeclared batch field(s) {sorted(unknown)}; declare them in matsciml.data.keys")
        object.__setattr__(self, "_data", data)

    # -- mapping access -----------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> KeysView[str]:
        return self._data.keys()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._data.items()

    def values(self) -> ValuesView[torch.Tensor]:
        return self._data.values()

    def replace(self, **fields: torch.Tensor) -> Batch:
        """A new batch sharing every tensor except ``fields``."""
        return Batch(self._data, **fields)

    # -- sizes --------------------------------------------------------------------------
    # Sizes are returned as the shapes hold them, not through int(): under a symbolic trace they
    # are symbols, and int() would fix the traced graph to this batch's sizes.
    @property
    def num_structures(self) -> int:
        return self._data[K.NATOMS].shape[0]

    @property
    def num_atoms(self) -> int:
        return self._data[K.POSITIONS].shape[0]

    @property
    def num_edges(self) -> int:
        edges = self._data.get(K.EDGE_INDEX)
        return 0 if edges is None else edges.shape[1]

    # -- devices and dtypes -------------------------------------------------------------
    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, non_blocking: bool = False
    ) -> Batch:
        """Move every tensor to ``device``; cast floating fields to ``dtype`` if given."""
        moved = {}
        for name, value in self._data.items():
            target_dtype = dtype if dtype is not None and value.is_floating_point() else None
            moved[name] = value.to(device=device, dtype=target_dtype, non_blocking=non_blocking)
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` in its pinning thread."""
        return Batch(**{name: value.pin_memory() for name, value in self._data.items()})

    def __reduce__(self):
        # DataLoader workers send batches through a queue. torch would move each tensor into
        # its own shared-memory segment (a fixed cost per tensor, ~14 tensors per batch);
        # plain numpy bytes through the pipe cost several times less for batches this size.
        if all(t.device.type == "cpu" and not t.requires_grad and t.dtype in _NUMPY_SAFE for t in self._data.values()):
            return (_from_numpy, ({name: t.numpy() for name, t in self._data.items()},))
        return (_from_tensors, (self._data,))

    @property
    def device(self) -> torch.device:
        return self._data[K.POSITIONS].device

    def __repr__(self) -> str:
        lines = [
            f"Batch(num_structures={self.num_structures}, num_atoms={self.num_atoms}, "
            f"num_edges={self.num_edges}, device={self.device})"
        ]
        for name, value in self._data.items():
            field = K.FIELDS[name]
            dtype = str(value.dtype).removeprefix("torch.")
            units = field.units
            lines.append(f"  {name:<18} {dtype:<8} {list(value.shape)!s:<14}{units}".rstrip())
        return "\n".join(lines)


_NUMPY_SAFE = {torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64}


def _from_numpy(arrays: dict[str, np.ndarray]) -> Batch:
    return Batch(**{name: torch.from_numpy(array) for name, array in arrays.items()})


def _from_tensors(tensors: dict[str, torch.Tensor]) -> Batch:
    return Batch(**tensors)


def _field_property(field: K.Field) -> property:
    def getter(self: Batch) -> torch.Tensor | None:
        return self._data.get(field.name)

    def setter(self: Batch, value: torch.Tensor) -> None:
        self._data[field.name] = value

    shape = ", ".join(str(s) for s in field.shape)
    leading = "B, " if field.level == "structure" else ""
    units = f" [{field.units}]" if field.units else ""
    getter.__doc__ = f"{field.doc}{units}, shape ({leading}{shape}); None if absent."
    return property(getter, setter, doc=getter.__doc__)


for _field in K.FIELDS.values():
    if hasattr(Mapping, _field.name):
        raise TypeError(f"field name {_field.name!r} would hide Batch's Mapping method of that name; rename it")
    setattr(Batch, _field.name, _field_property(_field))


def collate(records: Sequence[Mapping[str, np.ndarray]]) -> Batch:
    """Batch validated records (see :func:`matsciml.data.records.validate_record`).

    Fields are combined according to their declared level; index fields are offset by
    the number of atoms before each structure. A field must be present in every record
    or in none.

    Raises:
        ValueError: empty input, or a field held by some records but not others.
    """
    if not records:
        raise ValueError("cannot collate an empty list of records")
    present = set(records[0])
    for position, record in enumerate(records[1:], start=1):
        if set(record) != present:
            odd = sorted(set(record) ^ present)
            raise ValueError(
                f"records 0 and {position} of the batch disagree on field(s) {odd}; every record"
                " of a dataset must carry the same fields"
            )
    natoms = np.fromiter((int(r[K.NATOMS]) for r in records), dtype=np.int64, count=len(records))
    ptr = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum(natoms, out=ptr[1:])

    out: dict[str, torch.Tensor] = {}
    for name, field in K.FIELDS.items():
        if name not in present:
            continue
        arrays = [r[name] for r in records]
        if field.level == "structure":
            stacked = np.array(arrays, dtype=field.dtype)  # faster than np.stack for small arrays
        elif field.is_index:
            offsets = np.repeat(ptr[:-1], [a.shape[field.cat_dim] for a in arrays])
            stacked = np.concatenate(arrays, axis=field.cat_dim) + offsets
        else:
            stacked = np.concatenate(arrays, axis=field.cat_dim)
        out[name] = torch.from_numpy(np.ascontiguousarray(stacked, dtype=field.dtype))
    # numpy's repeat: torch.repeat_interleave costs milliseconds per call on CPU
    out[K.STRUCTURE_INDEX] = torch.from_numpy(np.repeat(np.arange(len(records), dtype=np.int64), natoms))
    out[K.PTR] = torch.from_numpy(ptr)
    return Batch(**out)
