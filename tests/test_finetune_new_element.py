"""experiments/finetune_new_element.py: the Al set, the devset parent and the from-scratch arm, end to end in
tiny runs; the fine-tuned arm too once the tasks take ``init_from``."""

import importlib.util
import json
from pathlib import Path

import pytest

from matsciml.data.fingerprint import dataset_digest
from matsciml.records.provenance import load_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("finetune_new_element", ROOT / "experiments/finetune_new_element.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    return out, script.main(["--steps", "2", "--structures", "15", "--out", str(out)])


@pytest.mark.slow  # four fits in their own processes and an EMT set: about a minute of CPU
def test_every_arm_trains_and_is_scored_after_its_last_step(script, experiment):
    out, results = experiment
    arms = ["parent", "finetune", "scratch"] if script.has_init_from() else ["parent", "scratch"]
    assert [r["arm"] for r in results] == arms and all(r["val/force_mae"] > 0 for r in results)
    report = json.loads((out / "results.json").read_text())
    assert report["results"] == results and set(report["summary"]) == set(arms)
    al = {split: dataset_digest(out / "al" / split) for split in ("train", "val")}
    for result in results:
        record = load_record(result["run"])
        assert record["status"] == "COMPLETED" and record["config"]["trainer"]["max_steps"] == 2
        inputs = {i["role"]: i["digest"] for i in record["inputs"]}
        if result["arm"] == "parent":
            assert inputs["data.train_path"] == dataset_digest(ROOT / "devsets/s2ef/train")
        else:  # (b) and (c) train and validate on the Al set
            assert (inputs["data.train_path"], inputs["data.val_path"]) == (al["train"], al["val"])
        if result["arm"] == "finetune":  # its record names the parent run
            assert record["lineage"]["parent"]["run_id"] == load_record(results[0]["run"])["run_id"]
    if not script.has_init_from():
        assert "skipped" in report["note"]


def test_the_metric_is_the_last_logged_validation_value(script, tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,val/force_mae\n0,0,1.0,\n0,1,,0.5\n1,2,0.8,\n1,3,,0.25\n")
    assert script.last_value(metrics) == 0.25
    assert script.last_value(metrics, "val/energy_mae") is None


def test_only_the_finetuned_arm_starts_from_the_parent(script, tmp_path):
    parent = tmp_path / "runs/parent/seed0/checkpoints/last.ckpt"
    tuned = script.fit_command(tmp_path, "finetune", 1, 10, tmp_path / "al", parent)
    scratch = script.fit_command(tmp_path, "scratch", 1, 10, tmp_path / "al", None)
    assert f"--model.init_args.init_from={parent}" in tuned and not any("init_from" in a for a in scratch)
    assert [a for a in tuned if "init_from" not in a] == [a.replace("scratch", "finetune") for a in scratch]
    assert f"--data.init_args.train_path={tmp_path / 'al' / 'train'}" in scratch


def test_a_completed_parent_of_the_same_steps_is_reused(script, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    record = {"status": "COMPLETED", "config": {"trainer": {"max_steps": 600}}}
    (tmp_path / "step.json").write_text(json.dumps(record))
    assert script.completed(tmp_path, 600) and not script.completed(tmp_path, 300)
    (tmp_path / "step.json").write_text(json.dumps({**record, "status": "FAILED"}))
    assert not script.completed(tmp_path, 600)
