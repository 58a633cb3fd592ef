"""`matsciml hpo` over real devset fit runs: records, resume, parallel workers, pruning, errors."""

import io
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import yaml
from distributed.test_ddp import base_env

from matsciml.cli.app import main
from matsciml.hpo.space import SpaceError, load_space
from matsciml.hpo.trial import run_fit, trial_dir
from matsciml.records.provenance import load_record, load_schema

optuna = pytest.importorskip("optuna")

# the legacy DGL environment (make test-dgl) collects every module but lacks the test extra
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
ROOT = Path(__file__).resolve().parents[1]
BASE = "configs/devset/is2re-egnn.yaml"
QUICK = {
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 2,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "data.init_args.batch_size": 4,
}
PARAMETERS = {
    "model.init_args.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "model.init_args.model.init_args.hidden": {"type": "int", "low": 8, "high": 16},
}


def write_space(folder: Path, name: str = "space", **extra) -> Path:
    content = {"metric": "val/energy_mae", "direction": "minimize", "parameters": PARAMETERS, "fixed": QUICK, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def hpo(space: Path, study_dir: Path, trials: int, *extra: str) -> list[str]:
    return [
        "hpo",
        "--config",
        BASE,
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--study-dir",
        str(study_dir),
        *extra,
    ]


def load_study(study_dir: Path, name: str = "space") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")


def valid_record(path: Path) -> dict:
    record = load_record(path)
    jsonschema.validate(record, load_schema(), format_checker=jsonschema.FormatChecker())
    return record


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A study of 4 trials from one command."""
    folder = tmp_path_factory.mktemp("hpo")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the devset paths in the base config are relative to the repository
        assert main(hpo(write_space(folder), folder / "study", 4)) == 0
    return folder / "study"


def test_every_trial_is_a_recorded_fit(study_dir):
    trials = load_study(study_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == (study_dir / "trials" / f"trial_{trial.number:04d}").resolve()
        record = valid_record(run_dir / "step.json")
        assert record["step"] == "fit" and record["status"] == "COMPLETED"
        assert record["metrics"]["best"]["val/energy_mae"]["value"] == trial.value
        assert record["config"]["model"]["init_args"]["lr"] == pytest.approx(trial.params["model.init_args.lr"])
        assert record["config"]["trainer"]["max_epochs"] == 2  # the space's fixed overrides
        assert record["links"]["optuna"] == {
            "study": "space",
            "storage": f"sqlite:///{study_dir.resolve()}/study.db",
            "trial": trial.number,
            "params": trial.params,
            "state": "COMPLETE",
            "value": trial.value,
        }


def test_study_record_points_at_the_best_trial(study_dir, capsys):
    trials = load_study(study_dir).get_trials()
    best = min(trials, key=lambda t: t.value)
    record = valid_record(study_dir / "step.json")
    assert record["step"] == "hpo" and record["status"] == "COMPLETED"
    assert record["config"]["backend"] == "optuna" and record["config"]["trials"] == 4
    assert {i["role"] for i in record["inputs"]} == {"config", "space"}
    assert all(i["digest"].startswith("sha256:") for i in record["inputs"])
    assert record["outputs"][0]["path"] == str((study_dir / "study.db").resolve())
    link = record["links"]["optuna"]["best_trial"]
    assert link["number"] == best.number and link["value"] == best.value == min(t.value for t in trials)
    assert link["params"] == best.params and link["run_dir"] == best.user_attrs["run_dir"]
    assert record["metrics"]["final"]["val/energy_mae"] == best.value
    assert record["metrics"]["final"]["trials_complete"] == 4
    # the study folder lists its own record and its trials' (nested) ones
    assert main(["runs", "list", str(study_dir), "--format", "csv"]) == 0
    listed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert sorted(listed["step"]) == ["fit"] * 4 + ["hpo"]
    assert set(listed["status"]) == {"COMPLETED"}


def test_rerunning_resumes_the_study(study_dir, monkeypatch, capsys):
    before = {t.number: (t.params, t.value, t.datetime_complete) for t in load_study(study_dir).get_trials()}
    monkeypatch.chdir(ROOT)
    space = Path(load_record(study_dir / "step.json")["config"]["space_file"])
    assert main(hpo(space, study_dir, 6)) == 0
    assert "6 complete, 0 pruned, 0 failed" in capsys.readouterr().out
    after = load_study(study_dir).get_trials()
    assert [t.number for t in after] == list(range(6))
    assert {t.number: (t.params, t.value, t.datetime_complete) for t in after[:4]} == before
    assert load_record(study_dir / "step.json")["config"]["trials"] == 6


def test_two_workers_share_one_study(tmp_path):
    command = [sys.executable, "-m", "matsciml", *hpo(write_space(tmp_path), tmp_path / "study", 4)]
    workers = [
        subprocess.Popen(command, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    trials = load_study(tmp_path / "study").get_trials()
    # exactly the 4 trials asked for, numbered once each, every one with its own run folder
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for trial in trials:
        assert load_record(trial.user_attrs["run_dir"])["links"]["optuna"]["trial"] == trial.number
    # and the two workers did run at the same time
    assert any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
        if a.number < b.number
    )
    record = valid_record(tmp_path / "study" / "step.json")
    assert record["status"] == "COMPLETED"


def test_pruned_trials_stop_early(tmp_path, monkeypatch, capsys):
    # any validation error is above 0: every trial is pruned after its first epoch
    space = write_space(tmp_path, fixed={**QUICK, "trainer.max_epochs": 3}, pruner={"type": "threshold", "upper": 0.0})
    monkeypatch.chdir(ROOT)
    assert main(hpo(space, tmp_path / "study", 2)) == 0
    assert "0 complete, 2 pruned, 0 failed" in capsys.readouterr().out
    trials = load_study(tmp_path / "study").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        record = valid_record(run_dir / "step.json")
        assert record["status"] == "COMPLETED"
        assert record["links"]["optuna"]["state"] == "PRUNED" and record["links"]["optuna"]["pruned_at_epoch"] == 0
        assert pd.read_csv(run_dir / "metrics.csv")["epoch"].max() == 0  # of 3 epochs
        assert list(trial.intermediate_values) == [0]
    record = valid_record(tmp_path / "study" / "step.json")
    assert record["status"] == "COMPLETED" and record["links"]["optuna"]["best_trial"] is None


def test_failing_trials(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    # trials that raise midway fail, and the study goes on
    boom = {"class_path": "helpers.interrupts.RaiseAtStep", "init_args": {"step": 1, "message": "boom at 1"}}
    failing = write_space(tmp_path, "failing", fixed={**QUICK, "trainer.callbacks": [boom]})
    assert main(hpo(failing, tmp_path / "failing", 2)) == 0
    assert "0 complete, 0 pruned, 2 failed" in capsys.readouterr().out
    trials = load_study(tmp_path / "failing", "failing").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 2
    assert trials[0].user_attrs["error"] == "RuntimeError: boom at 1"
    record = valid_record(Path(trials[0].user_attrs["run_dir"]) / "step.json")
    assert record["status"] == "FAILED" and record["links"]["optuna"]["state"] == "FAIL"
    assert valid_record(tmp_path / "failing" / "step.json")["status"] == "COMPLETED"
    # a key fit does not know, or a metric it does not log, would fail every trial alike: the command stops
    typo = write_space(tmp_path, "typo", parameters={"model.init_args.learning_rate": PARAMETERS["model.init_args.lr"]})
    assert main(hpo(typo, tmp_path / "typo", 3)) == 2
    assert "matsciml: error: matsciml fit refused the trial's arguments" in capsys.readouterr().err
    assert len(load_study(tmp_path / "typo", "typo").get_trials()) == 1
    assert valid_record(tmp_path / "typo" / "step.json")["status"] == "FAILED"
    metric = write_space(tmp_path, "metric", metric="val/energy_mea")
    assert main(hpo(metric, tmp_path / "metric", 3)) == 2
    assert "logged no metric 'val/energy_mea'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"parameters": {}}, "parameters"),
        ({"parameters": {"model.init_args.lr": {"type": "float", "low": 1.0, "high": 0.1}}}, "model.init_args.lr.low"),
        (
            {"parameters": {"model.init_args.lr": {"type": "uniform", "low": 0.1, "high": 1.0}}},
            "model.init_args.lr.type",
        ),
        (
            {"parameters": {"model.init_args.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
            "model.init_args.lr.low",
        ),
        (
            {"parameters": {"data.init_args.batch_size": {"type": "categorical", "choices": []}}},
            "data.init_args.batch_size.choices",
        ),
        ({"direction": "down"}, "direction"),
        ({"pruner": {"type": "sometimes"}}, "pruner.type"),
        ({"budget": 3}, "budget"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, capsys, change, key):
    space = write_space(tmp_path, **change)
    with pytest.raises(SpaceError, match=key.replace(".", r"\.")):
        load_space(space)
    assert main(hpo(space, tmp_path / "study", 1)) == 2
    error = capsys.readouterr().err
    assert error.startswith("matsciml: error: ") and str(space) in error and key in error
    assert not (tmp_path / "study").exists()  # nothing written for a space that does not parse


def test_sigopt_without_token_or_library_is_a_clear_error(tmp_path, monkeypatch, capsys):
    space = write_space(tmp_path)
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SIGOPT_API_TOKEN", raising=False)
    assert main(hpo(space, tmp_path / "study", 1, "--backend", "sigopt")) == 2
    assert "SIGOPT_API_TOKEN" in capsys.readouterr().err
    try:
        import sigopt  # noqa: F401
    except ImportError:
        monkeypatch.setenv("SIGOPT_API_TOKEN", "not-a-token")
        assert main(hpo(space, tmp_path / "study", 1, "--backend", "sigopt")) == 2
        assert "pip install 'matsciml[sigopt]'" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


class RootDirProbe(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.root = trainer.default_root_dir


def test_a_trial_is_rooted_in_its_folder_whatever_the_base_config_says(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / BASE).read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path / "elsewhere")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config))
    run_dir = trial_dir(tmp_path / "study", 0)
    probe = RootDirProbe()
    record = run_fit(base, [f"--{key}={value}" for key, value in QUICK.items()], run_dir, [probe])
    assert record["status"] == "COMPLETED" and Path(probe.root) == run_dir
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "step.json").is_file()
    assert not (tmp_path / "elsewhere").exists()
