"""`matsciml data info` and `data check` on matsciml and legacy datasets."""

import json

import pytest
from rich.console import Console

from matsciml.cli.app import main
from matsciml.data.check import check_dataset
from matsciml.data.info import describe


def test_info_prints_the_card(s2ef_path):
    console = Console(record=True, width=150)
    card = describe(s2ef_path, console=console)
    text = console.export_text()
    assert card["num_records"] == 12 and card["num_shards"] == 3
    for expected in (
        "matsciml-lmdb, 3 shard(s)",
        "s2ef",
        "Cu:",
        "Pt:",
        "O:",
        "energy eV",
        "|forces| eV/Å",
        "content_hash",
    ):
        assert expected in text


def test_info_json_and_cli_exit_codes(s2ef_path, tmp_path, capsys):
    assert main(["data", "info", str(s2ef_path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["task"] == "s2ef" and card["statistics"]["energy"]["count"] == 12
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert "no such dataset file or directory" in capsys.readouterr().err


def test_check_batches_everything_and_reports(s2ef_path):
    console = Console(record=True, width=200)
    totals = check_dataset(s2ef_path, task="s2ef", batch_size=5, console=console)
    assert totals["structures"] == 12 and totals["atoms"] == 12 * 13 and totals["edges"] > 0
    assert "no problems found" in console.export_text()


def test_check_names_the_bad_record(s2ef_path, capsys):
    # every slab has bonds shorter than 5 Å: record 0 is the first refused
    assert main(["data", "check", str(s2ef_path), "--min-distance", "5"]) == 2
    assert "data.0000.lmdb, record 0: atoms " in capsys.readouterr().err


@pytest.mark.parametrize("task", ["is2re"])
def test_check_requires_the_task_targets(s2ef_path, task, capsys):
    assert main(["data", "check", str(s2ef_path), "--task", task]) == 2
    assert "missing required field(s) ['relaxed_energy']" in capsys.readouterr().err
