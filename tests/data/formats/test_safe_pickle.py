"""The restricted unpickler: rebuilds tensors, arrays and containers, refuses everything else."""

from __future__ import annotations

import builtins
import collections
import importlib
import io
import os
import pickle
import shlex
import subprocess
import warnings

import numpy as np
import pytest
import torch

from matsciml.data.formats import safe_pickle
from matsciml.data.formats.safe_pickle import (
    CorruptPickleError,
    ForbiddenGlobalError,
    MunchState,
    PygData,
    safe_loads,
)


class _Reduce:
    """An object whose pickle is exactly ``func(*args)``, to hand-craft payloads."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(marker) -> _Reduce:
    return _Reduce(os.system, f"touch {shlex.quote(str(marker))}")


@pytest.mark.parametrize("module", ["torch_geometric", "munch"])
def test_runs_without_pyg_or_munch(module):
    # The point of the shims: these tests run where neither package is installed.
    with pytest.raises(ImportError):
        importlib.import_module(module)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_round_trips_tensors_arrays_and_containers(protocol):
    view = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:3]  # non-contiguous, offset view
    obj = {
        "view": view,
        "long": torch.tensor([1, 2, 3]),
        "bool": torch.tensor([True, False]),
        "scalar_tensor": torch.tensor(2.5, dtype=torch.float64),
        "array": np.arange(5.0),
        "np_scalar": np.float32(2.5),
        "bytes": b"\x00\xffxyz",
        "set": {1, 2},
        "ordered": collections.OrderedDict(a=1),
        "nested": [(1, 2.0, "s"), None],
    }
    out = safe_loads(pickle.dumps(obj, protocol=protocol))
    assert torch.equal(out["view"], view) and out["view"].dtype == torch.float32
    assert torch.equal(out["long"], obj["long"]) and out["long"].dtype == torch.int64
    assert torch.equal(out["bool"], obj["bool"])
    assert out["scalar_tensor"].item() == 2.5 and out["scalar_tensor"].dtype == torch.float64
    np.testing.assert_array_equal(out["array"], obj["array"])
    assert out["np_scalar"] == np.float32(2.5) and out["np_scalar"].dtype == np.float32
    assert out["bytes"] == obj["bytes"] and out["set"] == {1, 2}
    assert out["ordered"] == obj["ordered"] and out["nested"] == obj["nested"]


@pytest.mark.parametrize("core", [b"numpy.core", b"numpy._core"])
def test_reads_numpy_1_and_2_module_paths(core):
    # numpy < 2 pickles name numpy.core.multiarray, numpy 2 numpy._core.multiarray: whichever
    # numpy wrote this pickle, rewrite it to each path and read both.
    data = pickle.dumps({"a": np.arange(3, dtype=np.int32), "s": np.float64(1.5)}, protocol=2)
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    rewritten = data.replace(b"cnumpy.core.multiarray\n", b"c" + core + b".multiarray\n")
    assert b"c" + core + b".multiarray\n" in rewritten
    out = safe_loads(rewritten)
    np.testing.assert_array_equal(out["a"], [0, 1, 2])
    assert out["s"] == 1.5


def test_pyg_and_munch_classes_become_shims():
    data = b"\x80\x02ctorch_geometric.data.data\nData\n)\x81}X\x03\x00\x00\x00posK\x01sb."
    out = safe_loads(data)
    assert type(out) is PygData and out.__dict__ == {"pos": 1}
    munch = safe_loads(b"\x80\x02cmunch\nMunch\n)\x81}X\x01\x00\x00\x00yK\x02sb.")
    assert type(munch) is MunchState and munch == {"y": 2}


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (lambda m: _touch(m), f"{os.system.__module__}.system"),
        (
            lambda m: _Reduce(builtins.eval, f"__import__('os').system('touch ' + {str(m)!r})"),
            "builtins.eval",
        ),
        (lambda m: _Reduce(subprocess.call, ["touch", str(m)]), "subprocess.call"),
        (lambda m: _Reduce(getattr, (1, 2), "count"), "builtins.getattr"),
    ],
)
def test_code_execution_payloads_are_refused(tmp_path, payload, named):
    marker = tmp_path / "MARKER"
    data = pickle.dumps({"pos": payload(marker)})
    with pytest.raises(ForbiddenGlobalError, match=named.replace(".", r"\.")) as info:
        safe_loads(data)
    assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_os_system_payload_is_live_under_plain_pickle(tmp_path):
    # Control: the payload used above really runs code when loaded with pickle.loads.
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_touch(marker)))
    assert marker.exists()


def _legacy_stream(obj) -> bytes:
    """A legacy ``torch.save`` stream (as storages pickle) whose storage record is ``obj``."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    sys_info = {
        "protocol_version": PROTOCOL_VERSION,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    return b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info, obj))


def _zip_stream(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("stream", [_legacy_stream, _zip_stream, lambda obj: pickle.dumps(obj, protocol=2)])
def test_storage_loader_never_runs_an_inner_pickle(tmp_path, stream):
    marker = tmp_path / "MARKER"
    inner = stream(_touch(marker))
    data = pickle.dumps(_Reduce(torch.storage._load_from_bytes, inner))
    with pytest.raises(CorruptPickleError, match="cannot load tensor storage"):
        safe_loads(data)
    assert not marker.exists()
    # Control: torch's own _load_from_bytes (weights_only=False) would have run it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pickle.loads(data)
        except Exception:  # after the payload ran, what is left is no valid storage
            pass
    assert marker.exists()


@pytest.fixture
def load_calls(monkeypatch):
    """The ``weights_only`` argument of every ``torch.load`` call."""
    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(6, dtype=torch.float32).reshape(2, 3),
        torch.tensor([1.5, -2.0], dtype=torch.float64),
        torch.tensor([1.5, -2.0], dtype=torch.float16),
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        torch.tensor([-(2**40), 7]),
        torch.tensor([1, -2], dtype=torch.int32),
        torch.tensor([1, 2], dtype=torch.int16),
        torch.tensor([-1, 2], dtype=torch.int8),
        torch.tensor([255, 0], dtype=torch.uint8),
        torch.tensor([True, False]),
        torch.tensor([1 + 2j], dtype=torch.complex64),
        torch.zeros(0, 3),
    ],
    ids=str,
)
def test_legacy_storage_fast_path_matches_torch(tensor, load_calls):
    data = pickle.dumps(tensor)
    out = safe_loads(data)
    assert load_calls == []  # parsed directly, no torch.load at all
    assert out.dtype == tensor.dtype and torch.equal(out, tensor)
    assert torch.equal(out, pickle.loads(data))


def test_other_storage_streams_go_through_weights_only_load(load_calls):
    from torch._utils import _rebuild_tensor_v2

    storage = _storage(4)
    stream = _Reduce(torch.storage._load_from_bytes, _zip_stream(storage))
    out = safe_loads(pickle.dumps(_Reduce(_rebuild_tensor_v2, stream, 1, (3,), (1,), False, None)))
    assert out.tolist() == [1.0, 2.0, 3.0]
    assert load_calls == [True]


def test_truncated_storage_stream_is_refused(load_calls):
    from torch._utils import _rebuild_tensor_v2

    _, (stream,) = _storage(4).__reduce__()
    cut = _Reduce(torch.storage._load_from_bytes, stream[:-3])
    with pytest.raises(CorruptPickleError, match="cannot load tensor storage"):
        safe_loads(pickle.dumps(_Reduce(_rebuild_tensor_v2, cut, 0, (4,), (1,), False, None)))
    assert load_calls == [True]  # the fast path declined; torch's restricted loader refused


def _storage(numel: int) -> torch.storage.TypedStorage:
    return torch.arange(numel, dtype=torch.float32).__reduce_ex__(2)[1][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, (100,), (1,)), "elements over a storage"),
        ((3, (2,), (1,)), "past the end"),
        ((0, (2, 2), (3, 1)), "past the end"),
        ((0, (2,), (-1,)), "negative"),
        ((0, (2,), (1, 1)), "malformed"),
    ],
)
def test_tensor_views_outside_their_storage_are_refused(args, message):
    from torch._utils import _rebuild_tensor_v2

    data = pickle.dumps(_Reduce(_rebuild_tensor_v2, _storage(4), *args, False, collections.OrderedDict()))
    with pytest.raises(CorruptPickleError, match=message):
        safe_loads(data)


def test_old_rebuild_tensor_is_supported():
    from torch._utils import _rebuild_tensor

    out = safe_loads(pickle.dumps(_Reduce(_rebuild_tensor, _storage(6), 1, (2, 2), (2, 1))))
    assert out.tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    "target",
    [
        b"ctorch._utils\n_rebuild_tensor_v2\n",
        b"ctorch_geometric.data.data\nData\n",
        b"cmunch\nMunch\n",
        b"cnumpy._core.numeric\n_frombuffer\n",
    ],
)
def test_build_cannot_rewrite_allowed_globals(target):
    # BUILD with slot state {"__defaults__": ()} on the global itself would setattr on it.
    attack = target + b"(N(dS'__defaults__'\n(tstb."
    with pytest.raises(CorruptPickleError):
        safe_loads(attack)
    assert safe_loads(pickle.dumps(torch.ones(2))).tolist() == [1.0, 1.0]


def test_reconstruct_accepts_only_what_numpy_writes():
    from numpy._core.multiarray import _reconstruct

    huge = pickle.dumps(_Reduce(_reconstruct, np.ndarray, (10**6, 10**6), b"b"))
    with pytest.raises(CorruptPickleError, match="numpy never writes"):
        safe_loads(huge)


def test_ndarray_type_is_not_callable_directly():
    # numpy.ndarray resolves to a token usable only by _reconstruct, not a constructor.
    attack = b"cnumpy\nndarray\n((I4\ntS'abcd'\ntR."
    with pytest.raises(CorruptPickleError):
        safe_loads(attack)


@pytest.mark.parametrize("cut", [1, 10, 0.5, -1])
def test_truncated_pickles_raise_unpickling_errors(cut):
    data = pickle.dumps({"pos": torch.rand(4, 3), "y": 1.0})
    end = int(len(data) * cut) if isinstance(cut, float) else cut
    with pytest.raises(CorruptPickleError):
        safe_loads(data[:end])


def test_persistent_ids_are_refused():
    with pytest.raises(CorruptPickleError, match="persistent"):
        safe_loads(b"\x80\x02X\x01\x00\x00\x00aQ.")


def test_allow_list_names_no_dangerous_module():
    modules = {module for module, _ in safe_pickle._allowed()}
    assert not modules & {"os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil"}
    assert ("builtins", "eval") not in safe_pickle._allowed()
    assert ("builtins", "getattr") not in safe_pickle._allowed()


def test_shim_classes_are_sealed():
    for cls in (PygData, MunchState, safe_pickle._allowed()["torch_geometric.data.data", "DataEdgeAttr"]):
        with pytest.raises(AttributeError):
            cls.__setstate__ = dict
