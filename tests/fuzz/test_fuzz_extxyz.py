"""Fuzzing the extxyz import (ase_io.plan_units + read_unit): mutated extended-XYZ text."""

import tracemalloc

import pytest
from helpers.fuzz import TARGETS, run
from helpers.mutations import fuzz_inputs
from hypothesis import given, settings

from matsciml.data.errors import DataError
from matsciml.data.formats import ase_io

TARGET = TARGETS["extxyz"]


@settings(settings.get_profile("fuzz"), max_examples=120)
@given(data=fuzz_inputs(TARGET.seeds()))
def test_any_input_loads_or_raises_a_data_error(data, workdir):
    run(TARGET, data, workdir)


def peak_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_an_atom_count_past_the_end_of_the_file_costs_no_memory(tmp_path):
    path = tmp_path / "frames.xyz"
    path.write_text("1000000\ncomment\nCu 0 0 0\n")  # the fuzzer's 99999999999 made a list of that many lines

    def plan():
        with pytest.raises(DataError, match="record 0: file ends inside a frame of 1000000 atoms"):
            ase_io.plan_units(path, "s2ef")

    assert peak_bytes(plan) < 1 << 20


def test_more_declared_columns_than_an_atom_line_holds_are_refused_before_ase_reads(tmp_path):
    # found by the fuzzer as forces:R:99999999: ASE built a dtype of every column, 8.8 GB and 20 s
    path = tmp_path / "frames.xyz"
    path.write_text(
        '1\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:forces:R:200000 energy=1.0 pbc="T T T"\n'
        "Cu 0 0 0 0.1 0.2 0.3\n"
    )

    def plan():
        with pytest.raises(DataError, match="record 0: Properties declares 200004 columns per atom, the first atom"):
            ase_io.plan_units(path, "s2ef")

    assert peak_bytes(plan) < 8 << 20


def test_frames_as_ase_writes_them_still_read(workdir):
    for seed in TARGET.seeds():
        assert run(TARGET, seed, workdir) is None
