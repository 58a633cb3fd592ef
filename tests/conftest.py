"""Session-wide test data, generated with ASE EMT in a temporary directory."""

import pytest
from helpers.structures import write_dataset


@pytest.fixture(scope="session")
def s2ef_path(tmp_path_factory):
    """12 S2EF records in three shards (5, 5, 2)."""
    return write_dataset(tmp_path_factory.mktemp("s2ef") / "train", 12, "s2ef", records_per_shard=5)


@pytest.fixture(scope="session")
def is2re_path(tmp_path_factory):
    """6 IS2RE records in one data.lmdb."""
    return write_dataset(tmp_path_factory.mktemp("is2re") / "train", 6, "is2re")
