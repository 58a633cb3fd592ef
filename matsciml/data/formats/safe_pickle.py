"""A restricted unpickler for OpenCatalyst (OC20) LMDB records.

OC20 values are ``pickle.dumps(torch_geometric.data.Data)``; plain :func:`pickle.loads`
would run whatever code an untrusted file names. :func:`safe_loads` instead resolves only
an allow-list of globals:

* plain containers (``dict``, ``list``, ``set``, ``collections.OrderedDict``, ...);
* numpy arrays, scalars and dtypes (``numpy.core.*`` and ``numpy._core.*`` paths);
* torch tensors as ``pickle.dumps(tensor)`` writes them in torch 1.x and 2.x:
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` whose storage is
  ``torch.storage._load_from_bytes(bytes)`` holding a legacy ``torch.save`` stream. That
  stream is parsed here (its pickles may name storage types only) or, in any other
  layout, loaded with ``torch.load(weights_only=True)``, torch's own restricted loader:
  never with the ``weights_only=False`` that torch's ``_load_from_bytes`` uses. Every
  tensor view is checked against its storage's size;
* ``torch_geometric`` data classes and ``munch.Munch``, mapped to the local shims below,
  which only store their pickled state: neither package needs to be installed.

Every other global raises :class:`ForbiddenGlobalError` naming it. Allowed functions are
handed out wrapped in immutable callables, so a pickle's ``BUILD`` opcode cannot rewrite
their attributes (``__defaults__`` and the like) for later records.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import pickle
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from matsciml.data.formats.pickle_sizes import check_sizes

__all__ = [
    "CorruptPickleError",
    "ForbiddenGlobalError",
    "MunchState",
    "PickledState",
    "PygData",
    "PygStorage",
    "SafeUnpickler",
    "safe_loads",
]


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a class or function outside the allow-list."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name
        super().__init__(
            f"pickle references {module}.{name}, which the safe loader refuses: only tensors, numpy"
            " arrays, plain containers and PyG/Munch data containers are allowed (the file may be"
            " malicious or written by an unsupported tool)"
        )


class CorruptPickleError(pickle.UnpicklingError):
    """The bytes are not a well-formed pickle of allowed objects (truncated, inconsistent)."""


# --- shims for classes whose packages need not be installed -------------------------


class _Sealed(type):
    """Metaclass that forbids class attribute assignment (e.g. by a pickle ``BUILD`` on the class)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__qualname__} is read-only")


class PickledState(metaclass=_Sealed):
    """Stand-in for a pickled object: its state lands in ``__dict__`` and nothing runs.

    Attributes:
        origin: ``module.qualname`` of the class the pickle named.
    """

    origin = "?"

    def __setstate__(self, state: Any) -> None:
        # Default pickling gives a dict, or (dict, slots dict) for classes with __slots__.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise CorruptPickleError(f"{self.origin} state is a {type(state).__name__}, expected a dict")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.origin}: {sorted(self.__dict__)}>"


def _shim(base: type, origin: str) -> type:
    return _Sealed(origin.rsplit(".", 1)[-1], (base,), {"origin": origin, "__module__": __name__})


class PygData(PickledState):
    """``torch_geometric.data.Data``: PyG 1.x keeps fields in ``__dict__``, PyG 2 in ``_store``."""

    origin = "torch_geometric.data.data.Data"


class PygStorage(PickledState):
    """``torch_geometric.data.storage.*Storage``: the fields are in ``__dict__["_mapping"]``."""

    origin = "torch_geometric.data.storage.GlobalStorage"


class MunchState(dict, metaclass=_Sealed):
    """``munch.Munch``: a dict subclass whose pickled state is its items again."""

    origin = "munch.Munch"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


# --- immutable wrappers for allowed functions ------------------------------------------


class _Callable:
    """An allowed function, wrapped so a pickle cannot set attributes on it."""

    __slots__ = ("_func", "_label")

    def __init__(self, func: Callable, label: str):
        object.__setattr__(self, "_func", func)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._label} is read-only")

    def __repr__(self) -> str:
        return f"<safe {self._label}>"


_NDARRAY = object()  # what the pickle's `numpy.ndarray` resolves to: usable only by _reconstruct
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_SCALAR = np.float64(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    # numpy always pickles an empty (0,) array and fills it in __setstate__, which checks
    # the data against the shape; a larger shape here would allocate without any data.
    if subtype is not _NDARRAY or shape != (0,):
        raise CorruptPickleError("numpy _reconstruct called with arguments numpy never writes")
    return _NP_RECONSTRUCT(np.ndarray, shape, dtype)


def _np_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any, *rest: Any) -> np.ndarray:
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype):
        raise CorruptPickleError("numpy _frombuffer called with unexpected arguments")
    return _NP_FROMBUFFER(buffer, dtype, shape, order, *rest)


def _codecs_encode(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol 0-2 pickles store bytes as _codecs.encode(str, "latin1"); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CorruptPickleError("_codecs.encode is allowed only to rebuild latin-1 bytes")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor (protocol 0/1 pickles of plain objects), for the shims only.
    if isinstance(cls, type) and issubclass(cls, PickledState) and base is object and state is None:
        return object.__new__(cls)
    if cls is MunchState and base is dict and isinstance(state, dict):
        return MunchState(state)
    raise CorruptPickleError("copyreg._reconstructor is allowed only for PyG and Munch data containers")


# --- torch tensors ------------------------------------------------------------------------


class _Storage(NamedTuple):
    """A loaded tensor storage: its bytes and, when the stream recorded one, its dtype."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype | None


_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization constants
_LEGACY_DTYPES = {
    f"{name}Storage": dtype
    for name, dtype in {
        "Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8,
        "Byte": torch.uint8, "Bool": torch.bool, "ComplexFloat": torch.complex64,
        "ComplexDouble": torch.complex128,
    }.items()
}  # fmt: skip


class _LegacyStreamUnpickler(pickle.Unpickler):
    """Reads the small pickles of a legacy ``torch.save`` stream; knows only storage types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.cuda") and name in _LEGACY_DTYPES:
            return _LEGACY_DTYPES[name]
        raise ForbiddenGlobalError(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return pid  # checked by _read_legacy_storage


def _read_legacy_storage(data: bytes) -> _Storage | None:
    """Parse the legacy stream ``pickle.dumps(storage)`` embeds, or ``None`` if it looks different.

    Layout (torch/serialization.py ``_legacy_save``): pickles of the magic number, the
    protocol version, system info, the storage as a persistent id ``("storage", type, key,
    location, numel, None)`` and ``[key]``; then an int64 element count and the raw bytes.
    Doing this directly is much faster than ``torch.load``, whose pure-Python restricted
    unpickler dominated record loading; anything unexpected falls back to it.
    """
    stream = io.BytesIO(data)
    try:
        end = 0
        for _ in range(5):  # five small pickles, each checked before it is read
            end = check_sizes(data, end)
        header = [_LegacyStreamUnpickler(stream).load() for _ in range(5)]
    except Exception:  # not this layout (zip stream, other writer): let torch.load decide
        return None
    magic, version, info, pid, keys = header
    if magic != _LEGACY_MAGIC or version != _LEGACY_PROTOCOL or not isinstance(info, dict):
        return None
    if info.get("little_endian") is not True or not (isinstance(pid, tuple) and len(pid) == 6):
        return None
    kind, dtype, key, _location, numel, view = pid
    if kind != "storage" or not isinstance(dtype, torch.dtype) or type(numel) is not int or view is not None:
        return None
    start, nbytes = stream.tell() + 8, numel * dtype.itemsize
    if keys != [key] or numel < 0 or len(data) != start + nbytes:
        return None
    if int.from_bytes(data[start - 8 : start], "little", signed=True) != numel:
        return None
    if nbytes == 0:
        return _Storage(torch.UntypedStorage(0), dtype)
    untyped = torch.UntypedStorage.from_buffer(data, "native", dtype=torch.uint8, count=nbytes, offset=start)
    return _Storage(untyped, dtype)


def _load_storage(data: Any) -> _Storage:
    """Replacement for ``torch.storage._load_from_bytes`` that never runs an unrestricted pickle."""
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptPickleError("tensor storage payload is not bytes")
    data = bytes(data)
    fast = _read_legacy_storage(data)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():  # TypedStorage deprecation chatter is not the user's concern
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch's restricted loader raises many types for bad input
        raise CorruptPickleError(f"cannot load tensor storage: {err}") from None
    if isinstance(storage, torch.storage.TypedStorage):
        return _Storage(storage._untyped_storage, storage.dtype)
    if isinstance(storage, torch.UntypedStorage):
        return _Storage(storage, None)
    raise CorruptPickleError(f"tensor storage payload holds a {type(storage).__name__}, not a storage")


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(type(v) is int for v in value)


def _view(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None, metadata: Any) -> torch.Tensor:
    """A tensor over ``storage``, refusing views that reach past it (``set_`` would grow it)."""
    if not isinstance(storage, _Storage):
        raise CorruptPickleError("tensor rebuilt from something that is not a loaded storage")
    untyped, dtype = storage.untyped, storage.dtype or dtype  # v3 passes the dtype separately
    if not isinstance(dtype, torch.dtype):
        raise CorruptPickleError("tensor rebuilt without a dtype")
    if type(offset) is not int or not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride):
        raise CorruptPickleError("tensor offset, size or stride malformed")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CorruptPickleError("tensor offset, size or stride negative")
    available = untyped.nbytes() // dtype.itemsize
    numel = math.prod(size)
    if numel > max(available, 1):  # broadcast-style views could make a tiny payload huge in numpy
        raise CorruptPickleError(f"tensor of {numel} elements over a storage of {available}")
    if numel > 0 and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= available:
        raise CorruptPickleError("tensor view reaches past the end of its storage")
    tensor = torch.empty((0,), dtype=dtype).set_(untyped, offset, tuple(size), tuple(stride))
    if metadata:  # conj / neg bits of lazily conjugated or negated views
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and type(v) is bool for k, v in metadata.items()
        ):
            raise CorruptPickleError("tensor metadata malformed")
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


# requires_grad and backward hooks are ignored on purpose: records are data, never graph leaves.
def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return _view(storage, offset, size, stride, None, None)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _view(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _view(storage, offset, size, stride, dtype, metadata)


# --- the allow-list -------------------------------------------------------------------------


@functools.cache
def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}
    for name in ("dict", "list", "tuple", "set", "frozenset", "object"):
        table["builtins", name] = table["__builtin__", name] = getattr(__import__("builtins"), name)
    table["collections", "OrderedDict"] = collections.OrderedDict
    for module in ("copyreg", "copy_reg"):
        table[module, "_reconstructor"] = _Callable(_reconstructor, "copyreg._reconstructor")
    table["_codecs", "encode"] = _Callable(_codecs_encode, "_codecs.encode")

    table["numpy", "ndarray"] = _NDARRAY
    table["numpy", "dtype"] = np.dtype
    for core in ("numpy.core", "numpy._core"):  # numpy < 2 and >= 2 paths; never imported by name
        table[f"{core}.multiarray", "_reconstruct"] = _Callable(_np_reconstruct, "numpy _reconstruct")
        table[f"{core}.multiarray", "scalar"] = _NP_SCALAR
        table[f"{core}.numeric", "_frombuffer"] = _Callable(_np_frombuffer, "numpy _frombuffer")

    table["torch._utils", "_rebuild_tensor"] = _Callable(_rebuild_tensor, "torch _rebuild_tensor")
    table["torch._utils", "_rebuild_tensor_v2"] = _Callable(_rebuild_tensor_v2, "torch _rebuild_tensor_v2")
    table["torch._utils", "_rebuild_tensor_v3"] = _Callable(_rebuild_tensor_v3, "torch _rebuild_tensor_v3")
    table["torch.storage", "_load_from_bytes"] = _Callable(_load_storage, "torch storage loader")
    for name in dir(torch):  # dtypes appear as globals such as torch.float32 in _rebuild_tensor_v3
        if isinstance(getattr(torch, name, None), torch.dtype):
            table["torch", name] = getattr(torch, name)

    for name in ("Data", "DataEdgeAttr", "DataTensorAttr"):
        table["torch_geometric.data.data", name] = (
            PygData if name == "Data" else _shim(PickledState, f"torch_geometric.data.data.{name}")
        )
    for name in ("BaseStorage", "NodeStorage", "EdgeStorage", "GlobalStorage"):
        table["torch_geometric.data.storage", name] = (
            PygStorage if name == "GlobalStorage" else _shim(PygStorage, f"torch_geometric.data.storage.{name}")
        )
    table["munch", "Munch"] = MunchState
    return table


class SafeUnpickler(pickle.Unpickler):
    """:class:`pickle.Unpickler` that resolves only the allow-list in this module."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed()[module, name]
        except KeyError:
            raise ForbiddenGlobalError(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CorruptPickleError("pickle uses persistent ids, which OC20 records never do")


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` without running code from outside the allow-list.

    Raises:
        ForbiddenGlobalError: the pickle names a class or function that is not allowed.
        CorruptPickleError: the bytes are truncated or otherwise not a valid pickle.
    """
    try:
        check_sizes(data)
        return SafeUnpickler(io.BytesIO(data)).load()
    except (ForbiddenGlobalError, CorruptPickleError):
        raise
    except Exception as err:  # EOFError, UnpicklingError, TypeError from bad opcode arguments, ...
        raise CorruptPickleError(f"corrupt or truncated pickle ({type(err).__name__}: {err})") from None
