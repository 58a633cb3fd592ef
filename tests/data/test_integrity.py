"""Integrity of stored data: per-record CRC-32, the card's shard list, the content hash (issue 13).

Every test writes its own dataset with the project's writer and damages the files the way a disk,
a copy or a hand would, before anything in the process opens them (py-lmdb allows one open
environment per file and process).
"""

import re
import shutil

import numpy as np
import pytest
import torch
from helpers.corruption import delete_record, field_offset, flip_bit, record_value, rewrite_record
from helpers.oc20 import s2ef_record, write_oc20_lmdb, write_oc20_shards
from helpers.structures import write_dataset
from helpers.training import quiet_trainer, tiny_egnn
from rich.console import Console

from matsciml.cli.app import main
from matsciml.data.check import check_dataset
from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.datasets import LMDBDataset
from matsciml.data.devsets import devset_path
from matsciml.data.errors import DataError
from matsciml.data.formats import store
from matsciml.tasks import S2EFTask


@pytest.fixture
def dataset(tmp_path):
    """6 S2EF records in shards of 3, 3 (data.0000.lmdb, data.0001.lmdb)."""
    return write_dataset(tmp_path / "train", 6, "s2ef", records_per_shard=3)


def _moved_atom(value):
    """Offset of the byte whose bit 4 moves an atom by ~1e10 Å (the issue's case): the high byte
    of the first float32 coordinate in [2, 4), whose exponent then grows by 32."""
    positions = store.decode(value)["positions"].reshape(-1)
    first = int(np.flatnonzero((np.abs(positions) >= 2) & (np.abs(positions) < 4))[0])
    return field_offset(value, "positions") + 4 * first + 3


def _flip_position(dataset, shard="data.0001.lmdb", key=1):
    flip_bit(dataset / shard, key, _moved_atom(record_value(dataset / shard, key)), 4)


# the case (an atom moved by 1e10 Å), a bit of the header, of the version field and of the CRC itself
@pytest.mark.parametrize(
    "where",
    [
        pytest.param(_moved_atom, id="positions-exponent"),
        pytest.param(lambda v: field_offset(v, "tags"), id="tags"),
        pytest.param(lambda v: 12, id="json-header"),
        pytest.param(lambda v: 4, id="version-field"),
        pytest.param(lambda v: -1, id="crc-trailer"),
    ],
)
def test_a_flipped_bit_is_a_data_error_naming_shard_and_record(dataset, where):
    shard = dataset / "data.0001.lmdb"
    flip_bit(shard, 1, where(record_value(shard, 1)), 4)
    data = LMDBDataset(dataset)
    assert data.read(3)["positions"].shape == (13, 3)  # the other records of the shard still read
    with pytest.raises(DataError, match="checksum mismatch") as err:
        data.read(4)
    assert err.value.source == str(shard) and err.value.record == 1
    assert "restore this file from a good copy" in str(err.value)


def test_data_check_refuses_a_flipped_bit(dataset, capsys):
    _flip_position(dataset)
    assert main(["data", "check", str(dataset)]) == 2
    assert f"{dataset / 'data.0001.lmdb'}, record 1: checksum mismatch" in capsys.readouterr().err


def test_fit_stops_at_a_flipped_bit(dataset):
    _flip_position(dataset)
    datamodule = S2EFDataModule(train_path=dataset, val_path=dataset, batch_size=2, shuffle=False)
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), statistics=datamodule.target_statistics)
    with pytest.raises(DataError, match="checksum mismatch") as err:
        quiet_trainer(max_epochs=1).fit(task, datamodule=datamodule)
    assert err.value.source.endswith("data.0001.lmdb") and err.value.record == 1


def test_verify_detects_a_validly_encoded_edit(dataset, capsys):
    shard = dataset / "data.0000.lmdb"
    record = store.decode(record_value(shard, 2))
    record["positions"] = record["positions"] + np.float32(0.01)
    rewrite_record(shard, 2, store.encode(record))  # a correct CRC: only the content hash can tell
    assert main(["data", "check", str(dataset)]) == 0
    assert main(["data", "check", str(dataset), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"matsciml: error: {dataset}: content hash mismatch: the card says sha256:")
    assert err.count("\n") == 1


def test_verify_passes_on_intact_data(dataset):
    console = Console(record=True, width=300)
    check_dataset(dataset, verify=True, console=console)
    text = console.export_text()
    card = LMDBDataset(dataset).metadata
    assert f"integrity: content hash verified ({card['content_hash']})" in text
    assert "integrity: CRC-32 of every record verified on read (codec v2)" in text
    assert "integrity: shard files match the card's shard list (2 shards)" in text
    assert card["shards"] == [{"name": "data.0000.lmdb", "count": 3}, {"name": "data.0001.lmdb", "count": 3}]


def _other_dataset(path):
    return write_dataset(path, 3, "s2ef", records_per_shard=3) / "data.0000.lmdb"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d, tmp: (d / "data.0001.lmdb").unlink(), "shard(s) data.0001.lmdb missing: the card lists 2 shard(s)"),
        (
            lambda d, tmp: shutil.copy(d / "data.0000.lmdb", d / "data.0002.lmdb"),
            "data.0002.lmdb is a second copy of shard data.0000.lmdb (data.0000.lmdb)",
        ),
        (
            lambda d, tmp: shutil.copy(_other_dataset(tmp / "other"), d / "data.0002.lmdb"),
            "data.0002.lmdb belongs to another dataset",
        ),
        (
            lambda d, tmp: write_oc20_lmdb(d / "data.0002.lmdb", [s2ef_record()]),
            "data.0002.lmdb is not a shard of this matsciml dataset",
        ),
        (lambda d, tmp: delete_record(d / "data.0001.lmdb", 2), "data.0001.lmdb holds 2 records, the card says 3"),
    ],
    ids=["missing", "extra-copy", "extra-foreign", "extra-legacy", "short"],
)
def test_a_wrong_shard_set_is_an_error_on_open_info_check_and_fit(dataset, tmp_path, capsys, damage, message):
    damage(dataset, tmp_path)
    with pytest.raises(DataError) as err:
        LMDBDataset(dataset)
    assert str(err.value).startswith(f"{dataset}: ") and message in str(err.value)
    for command in ("info", "check"):
        assert main(["data", command, str(dataset)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(DataError, match=re.escape(message)):
        quiet_trainer(max_epochs=1).fit(S2EFTask(tiny_egnn()), datamodule=S2EFDataModule(train_path=dataset))


def test_shards_renamed_out_of_order_are_an_error(dataset):
    (dataset / "data.0000.lmdb").rename(dataset / "data.0009.lmdb")  # its records would come last
    with pytest.raises(DataError, match="data.0001.lmdb, data.0009.lmdb hold shards data.0001.lmdb, data.0000.lmdb"):
        LMDBDataset(dataset)


def test_one_shard_named_on_its_own_reads_as_it_is(dataset, capsys):
    assert main(["data", "info", str(dataset / "data.0001.lmdb"), "--json"]) == 0
    assert '"num_records": 3' in capsys.readouterr().out


@pytest.fixture
def v1_devset(tmp_path):
    """A copy of the shipped S2EF train split: codec v1 records, a card without a shard list."""
    return shutil.copytree(devset_path("s2ef", "train"), tmp_path / "train")


def test_codec_v1_records_still_read_and_say_they_are_unchecked(v1_devset):
    value = record_value(v1_devset / "data.0000.lmdb", 0)
    assert LMDBDataset(v1_devset).metadata["codec_version"] == 1
    assert value[4:6] == b"\x01\x00" and len(value) % 8 == 0  # v1: no CRC trailer
    assert store.decode(value)["positions"].shape[1] == 3
    console = Console(record=True, width=300)
    check_dataset(v1_devset, verify=True, console=console)
    text = console.export_text()
    assert "integrity: no per-record checksums (codec v1)" in text
    assert "integrity: no shard list in the card: checked against its shard count (3) only" in text
    assert "integrity: content hash verified (sha256:5b13d4ae003d" in text


def test_data_check_verifies_the_content_hash_of_v1_data_by_itself(v1_devset, tmp_path, capsys):
    intact = shutil.copytree(v1_devset, tmp_path / "intact")  # another path: LMDB opens each file once
    assert main(["data", "check", str(intact)]) == 0
    assert "integrity: content hash verified (sha256:" in capsys.readouterr().out
    _flip_position(v1_devset)  # the case on a shipped devset: no CRC to catch it on read
    assert main(["data", "check", str(v1_devset)]) == 2
    assert f"matsciml: error: {v1_devset}: content hash mismatch" in capsys.readouterr().err


def test_a_lost_shard_of_a_v1_dataset_is_found_from_the_shard_count(v1_devset, capsys):
    (v1_devset / "data.0001.lmdb").unlink()  # the case: 200 records, then 133
    assert main(["data", "info", str(v1_devset)]) == 2
    expected = "data.0001.lmdb missing: the card lists 3 shard(s) holding 200 records, the folder has 2 holding 133"
    assert expected in capsys.readouterr().err


def test_legacy_oc20_files_say_they_have_no_checksums(tmp_path):
    path = tmp_path / "oc20"
    write_oc20_shards(path, [[s2ef_record(seed=0), s2ef_record(seed=1)], [s2ef_record(seed=2)]])
    console = Console(record=True, width=300)
    check_dataset(path, cutoff=10.0, verify=True, console=console)
    text = console.export_text()
    assert "integrity: no per-record checksums and no card (legacy OC20 pickle LMDB)" in text
    assert "integrity: no content hash to verify (legacy OC20 files have none)" in text
    assert "no problems found" in text
