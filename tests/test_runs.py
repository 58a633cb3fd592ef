"""Querying runs: `matsciml runs list|show|compare` and matsciml.records.runs over real fit runs."""

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from matsciml.cli.app import main
from matsciml.records import runs

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.batch_size=4",
]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """Three IS2RE runs: EGNN with seeds 0 and 1, MegNet with seed 0."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        for model, seed in (("egnn", 0), ("egnn", 1), ("megnet", 0)):
            assert (
                main(
                    [
                        "fit",
                        "--config",
                        f"configs/devset/is2re-{model}.yaml",
                        *QUICK,
                        f"--seed_everything={seed}",
                        f"--trainer.logger.init_args.save_dir={folder}",
                    ]
                )
                == 0
            )
    return folder


def test_load_gives_one_row_per_run(run_folder):
    frame = runs.load(run_folder)
    assert len(frame) == 3 and list(frame.columns[: len(runs.COLUMNS)]) == runs.COLUMNS
    assert sorted(zip(frame["model"], frame["seed"], strict=True)) == [("EGNN", 0), ("EGNN", 1), ("MegNet", 0)]
    assert set(frame["status"]) == {"COMPLETED"} and set(frame["task"]) == {"IS2RETask"}
    assert (frame["val/energy_mae"] > 0).all()
    egnn = runs.load([run_folder], where="status == 'COMPLETED' and model == 'EGNN' and `val/energy_mae` > 0")
    assert len(egnn) == 2


def test_compare_aggregates_over_seeds(run_folder):
    frame = runs.load(run_folder)
    table = runs.compare(frame, ["model"], ["val/energy_mae"]).set_index("model")
    egnn = frame[frame["model"] == "EGNN"]["val/energy_mae"]
    assert table.loc["EGNN", "val/energy_mae count"] == 2
    assert table.loc["EGNN", "val/energy_mae mean"] == pytest.approx(egnn.mean())
    assert table.loc["EGNN", "val/energy_mae std"] == pytest.approx(egnn.std())
    assert table.loc["MegNet", "val/energy_mae count"] == 1
    with pytest.raises(ValueError, match="no metric val/nothing"):
        runs.compare(frame, ["model"], ["val/nothing"])


def test_history_is_read_on_demand(run_folder):
    frame = runs.load(run_folder)
    history = runs.history(frame.iloc[0])
    assert "val/energy_mae" in history.columns and history["epoch"].max() == 1


def test_cli_list_compare_show(run_folder, capsys):
    assert main(["runs", "list", str(run_folder), "--format", "csv", "--metrics", "val/energy_mae"]) == 0
    listed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(listed) == 3 and "val/energy_mae" in listed.columns
    assert main(["runs", "list", str(run_folder), "--where", "model == 'MegNet'"]) == 0
    table = capsys.readouterr().out
    assert "MegNet" in table and "EGNN" not in table
    assert main(["runs", "compare", str(run_folder), "--group-by", "model", "--metrics", "val/energy_mae"]) == 0
    assert "(n=2)" in capsys.readouterr().out
    assert main(["runs", "compare", str(run_folder), "--format", "json"]) == 0
    assert {row["model"] for row in json.loads(capsys.readouterr().out)} == {"EGNN", "MegNet"}
    run_dir = runs.find_runs([run_folder])[0]
    assert main(["runs", "show", str(run_dir)]) == 0
    assert "fit COMPLETED" in capsys.readouterr().out


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["runs", "list", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "where",
    [
        "@os.system('touch x') == 0",
        "model.str.len() > 0",
        "__import__('os') == 1",
        "seed == seed.__class__",
        "status == 'COMPLETED' or (lambda: 1)() == 1",
    ],
)
def test_where_accepts_only_comparisons_names_and_literals(where):
    frame = pd.DataFrame(
        {"status": ["COMPLETED", "FAILED"], "model": ["EGNN", "Gala"], "seed": [0, 1], "val/energy_mae": [0.1, 0.3]}
    )
    with pytest.raises(ValueError, match="--where"):
        runs.where_mask(frame, where)
    assert not Path("x").exists()
    keep = runs.where_mask(frame, "status == 'COMPLETED' and not model in ['Gala'] and `val/energy_mae` < 0.2")
    assert keep.tolist() == [True, False]
    assert runs.where_mask(frame, "(seed >= 1) | (model != 'EGNN')").tolist() == [False, True]
    assert runs.where_mask(frame, "0 <= seed < 1").tolist() == [True, False]
