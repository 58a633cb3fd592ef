"""Fuzzing matsciml's record codec (store.decode), with and without the integrity fields resealed."""

import json
import struct

import numpy as np
import pytest
from helpers.fuzz import TARGETS, reseal, run
from helpers.mutations import fuzz_inputs
from hypothesis import given, settings

from matsciml.data.errors import DataError
from matsciml.data.formats import store


@pytest.mark.parametrize("name", ["store", "store-payload"])
def test_any_input_loads_or_raises_a_data_error(name, workdir):
    target = TARGETS[name]

    @settings(settings.get_profile("fuzz"), max_examples=300)
    @given(data=fuzz_inputs(target.seeds()))
    def check(data):
        run(target, data, workdir)

    check()


def value_with_header(header, payload: bytes = b"\0" * 64) -> bytes:
    """A record value as store.encode lays it out, with any JSON header and a valid CRC-32 trailer."""
    head = json.dumps(header).encode()
    head += b" " * (-(len(head) + 10) % 8)
    return reseal(struct.pack("<4sHI", store.MAGIC, store.CODEC_VERSION, len(head)) + head + payload + b"\0" * 4)


@pytest.mark.parametrize(
    "header, reason",
    [
        ([["Tags", "<i8", [2]]], "unknown field 'Tags'"),  # found by the fuzzer: KeyError in validation
        ([["tags", "[('a', '<i8')]", [1]]], "not a bool, integer or float"),  # numpy parsed it: SyntaxError
        ([["tags", "<i8", [-1]]], "not a list of non-negative integers"),  # decoded as a wrong-sized array
        ([["tags", "<i8", [2.0]]], "not a list of non-negative integers"),
        ({"tags": ["<i8", [1]]}, "not a list of fields"),
        ([["tags", "<i8"]], r"is not \[name, dtype, shape\]"),
    ],
    ids=["unknown-name", "structured-dtype", "negative-shape", "float-shape", "dict-header", "short-entry"],
)
def test_headers_are_checked_exactly_as_encode_writes_them(header, reason):
    with pytest.raises(DataError, match=f"data.lmdb, record 3: corrupt matsciml record: .*{reason}"):
        store.decode(value_with_header(header), "data.lmdb", 3)


def test_a_header_nested_too_deep_is_a_data_error():
    value = reseal(struct.pack("<4sHI", store.MAGIC, store.CODEC_VERSION, 100_000) + b"[" * 100_000 + b"\0" * 4)
    with pytest.raises(DataError, match="corrupt matsciml record"):
        store.decode(value, "data.lmdb", 3)


def test_encoded_records_still_round_trip():
    arrays = {"positions": np.ones((2, 3), np.float32), "natoms": np.asarray(2), "pbc": np.ones(3, bool)}
    decoded = store.decode(store.encode(arrays))
    assert {k: (v.dtype, v.shape) for k, v in decoded.items()} == {k: (v.dtype, v.shape) for k, v in arrays.items()}
    assert all(np.array_equal(decoded[k], v) for k, v in arrays.items())
