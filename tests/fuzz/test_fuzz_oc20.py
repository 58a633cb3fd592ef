"""Fuzzing the legacy OC20 decoder (oc20.decode + safe_pickle): mutated OCP pickles and arbitrary bytes."""

import pytest
from helpers.fuzz import TARGETS, run
from helpers.mutations import fuzz_inputs
from hypothesis import given, settings

from matsciml.data.errors import DataError
from matsciml.data.formats import oc20

TARGET = TARGETS["oc20"]


@settings(settings.get_profile("fuzz"), max_examples=300)
@given(data=fuzz_inputs(TARGET.seeds()))
def test_any_input_loads_or_raises_a_data_error(data, workdir):
    run(TARGET, data, workdir)


@pytest.mark.parametrize(
    "value, reason",
    [
        # LONG_BINPUT 2**24: CPython's memo array would grow to 256 MiB for a 12-byte pickle
        (b"\x80\x02N" + b"r" + (1 << 24).to_bytes(4, "little") + b".", "memo index 16777216"),
        (b"Np9999999\n.", "memo index 9999999"),  # protocol 0 PUT, index in decimal
        # BYTEARRAY8 of 2**40 bytes: allocated before the (absent) bytes are read
        (b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"xyz.", "declares 1099511627776 bytes"),
    ],
    ids=["long-binput", "put", "bytearray8"],
)
def test_declared_sizes_past_the_pickle_are_refused_before_unpickling(value, reason):
    with pytest.raises(DataError, match=reason):
        oc20.decode(value, "shard.lmdb", 7)


def test_a_negative_string_length_ends_the_size_check():
    from matsciml.data.formats.pickle_sizes import check_sizes

    # BINSTRING with length -8: a walk that added it would step backwards forever
    value = b"\x80\x02T" + (-8).to_bytes(4, "little", signed=True) + b"abcd."
    assert check_sizes(value) == len(value)
    with pytest.raises(DataError, match="shard.lmdb, record 7"):
        oc20.decode(value, "shard.lmdb", 7)


def test_valid_records_pass_the_size_check_whole():
    from matsciml.data.formats.pickle_sizes import check_sizes

    for seed in TARGET.seeds():
        assert check_sizes(seed) == len(seed)
