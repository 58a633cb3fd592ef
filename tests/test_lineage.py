"""Lineage of fine-tuned models: the step record names the parent by digest and run id, and `matsciml runs show`,
`matsciml export` and the model card show the chain back through every generation.

Parents and children are real fits through the CLI; a child starts from its parent with
``--model.init_args.init_from``.
"""

import json
import pickle
import shutil
from pathlib import Path

import pytest
from helpers.training import QUICK_FIT

from matsciml.artifacts.export import export_package
from matsciml.cli.app import main
from matsciml.records import lineage
from matsciml.records.lineage import directory_digest, parent_entry
from matsciml.records.provenance import load_record, load_schema, sha256_file

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (the test extra has it)")
ROOT = Path(__file__).resolve().parents[1]
RUN = Path("lightning_logs") / "version_0"


def fit(save_dir: Path, parent: Path | None = None) -> Path:
    """One tiny S2EF devset fit (from ``parent`` if given); its run folder."""
    extra = [] if parent is None else [f"--model.init_args.init_from={parent}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert main(["fit", *QUICK_FIT, *extra, f"--trainer.logger.init_args.save_dir={save_dir}"]) == 0
    return save_dir / RUN


def valid_record(run: Path) -> dict:
    record = load_record(run)
    jsonschema.validate(record, load_schema(), format_checker=jsonschema.FormatChecker())
    return record


def run_ids(entry: dict | None) -> list:
    return [generation["run_id"] for generation in lineage.chain(entry)]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def child_run(parent_run, tmp_path_factory):
    return fit(tmp_path_factory.mktemp("child"), parent_run / "checkpoints" / "last.ckpt")


def test_fit_from_a_checkpoint_records_the_parent_by_digest_and_run(parent_run, child_run, capsys):
    parent_ckpt = parent_run / "checkpoints" / "last.ckpt"
    record = valid_record(child_run)
    (parent_input,) = [i for i in record["inputs"] if i["role"] == "parent"]
    assert parent_input == {
        "role": "parent",
        "kind": "checkpoint",
        "path": str(parent_ckpt.resolve()),
        "digest": sha256_file(parent_ckpt),
    }
    entry = record["lineage"]
    assert entry["init_from"] == str(parent_ckpt)
    assert entry["parent"]["run_id"] == load_record(parent_run)["run_id"]
    assert entry["parent"]["digest"] == sha256_file(parent_ckpt) and entry["parent"]["parent"] is None
    assert entry["parent"]["note"] is None  # found its record: nothing unknown
    # every parameter and buffer fits (same data, same model): all loaded, counts match the names
    assert entry["counts"] == {key: len(entry["names"][key]) for key in lineage.REPORT_KEYS}
    assert entry["counts"]["loaded"] > 10 and entry["counts"]["new"] == entry["counts"]["dropped"] == 0

    # a run folder as init_from names its checkpoints/last.ckpt
    assert parent_entry(parent_run) == entry["parent"]

    capsys.readouterr()
    assert main(["runs", "show", str(child_run)]) == 0
    out = capsys.readouterr().out
    assert f"lineage: init_from {parent_ckpt}" in out and f"loaded {entry['counts']['loaded']}" in out
    (line,) = [line for line in out.splitlines() if line.startswith("   1 checkpoint")]
    assert entry["parent"]["run_id"] in line and sha256_file(parent_ckpt)[:19] in line and str(parent_ckpt) in line


def test_three_generations_chain_in_the_record_show_and_card(parent_run, child_run, tmp_path, capsys):
    grandchild = fit(tmp_path / "grandchild", child_run / "checkpoints" / "last.ckpt")
    record = valid_record(grandchild)
    ids = [load_record(run)["run_id"] for run in (child_run, parent_run)]
    assert run_ids(record["lineage"]["parent"]) == ids
    digests = [g["digest"] for g in lineage.chain(record["lineage"]["parent"])]
    assert digests == [sha256_file(run / "checkpoints" / "last.ckpt") for run in (child_run, parent_run)]

    capsys.readouterr()
    assert main(["runs", "show", str(grandchild)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if " checkpoint " in line and " run " in line] == ["1", "2"]

    # the exported model's card holds the chain: itself (0), its parent (1), its grandparent (2)
    package = export_package(
        grandchild / "checkpoints" / "last.ckpt", tmp_path / "model.msml", trusted_modules=["helpers"]
    )
    card = json.loads((package / "card.json").read_text())
    assert run_ids(card["lineage"]) == [record["run_id"], *ids]
    assert card["lineage"]["digest"] == sha256_file(grandchild / "checkpoints" / "last.ckpt")


def test_a_package_parent_is_named_by_its_digest_and_the_run_in_its_card(parent_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(parent_run), "--out", str(tmp_path / "parent.msml")]) == 0
    printed = capsys.readouterr().out
    parent_id = load_record(parent_run)["run_id"]
    assert "lineage" in printed and f"0 checkpoint run {parent_id}" in " ".join(printed.split())
    package = tmp_path / "parent.msml"
    child = fit(tmp_path / "child", package)
    record = valid_record(child)
    (parent_input,) = [i for i in record["inputs"] if i["role"] == "parent"]
    assert parent_input["kind"] == "model" and parent_input["digest"] == directory_digest(package)
    entry = record["lineage"]["parent"]
    assert entry["kind"] == "package" and entry["run_id"] == parent_id and entry["note"] is None
    assert entry["record"] == f"{package.resolve()}/card.json" and entry["parent"] is None

    # a zip package: the file's own digest, the same run
    zipped = export_package(parent_run / "checkpoints" / "last.ckpt", tmp_path / "parent.zip")
    entry = parent_entry(zipped)
    assert (entry["kind"], entry["digest"], entry["run_id"]) == ("package", sha256_file(zipped), parent_id)


def test_a_parent_without_its_step_record_gives_a_partial_entry(parent_run, tmp_path):
    orphan = tmp_path / "orphan" / "checkpoints"
    orphan.mkdir(parents=True)
    shutil.copy(parent_run / "checkpoints" / "last.ckpt", orphan / "last.ckpt")  # no step.json beside it
    child = fit(tmp_path / "child", orphan / "last.ckpt")
    entry = valid_record(child)["lineage"]["parent"]
    assert entry["digest"] == sha256_file(orphan / "last.ckpt") and entry["run_id"] is None
    assert "no step record" in entry["note"] and entry["parent"] is None

    (orphan.parent / "step.json").write_text("{ not json")  # unreadable: also partial, no crash
    assert "unreadable" in parent_entry(orphan / "last.ckpt")["note"]
    loose = shutil.copy(orphan / "last.ckpt", tmp_path / "loose.ckpt")
    assert "not in a run folder" in parent_entry(loose)["note"]


# -- the chain walk on hand-made run folders (no training needed) ---------------------------------------------
def fake_run(root: Path, name: str, parent: dict | None, content: bytes | None = None) -> Path:
    """A run folder with a checkpoint file and a step record whose lineage names ``parent``."""
    checkpoint = root / name / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(content or name.encode())
    record = {"run_id": name, "lineage": None if parent is None else {"parent": parent}}
    (root / name / "step.json").write_text(json.dumps(record))
    return checkpoint


def test_a_cycle_ends_the_chain(tmp_path):
    a, b = fake_run(tmp_path, "a", None), fake_run(tmp_path, "b", None)
    for child, parent in (("a", b), ("b", a)):  # a was fine-tuned from b, and b from a
        named = {"kind": "checkpoint", "path": str(parent), "digest": sha256_file(parent), "run_id": parent.parts[-3]}
        (tmp_path / child / "step.json").write_text(json.dumps({"run_id": child, "lineage": {"parent": named}}))
    generations = lineage.chain(parent_entry(a))
    assert [g["run_id"] for g in generations] == ["a", "b", None]
    assert generations[-1]["path"] == str(a.resolve()) and "cycle" in generations[-1]["note"]


def test_a_deep_chain_is_cut(tmp_path):
    parent = None
    for number in range(6):
        checkpoint = fake_run(tmp_path, f"run{number}", parent)
        parent = parent_entry(checkpoint)
    entry = parent_entry(checkpoint, max_generations=3)
    generations = lineage.chain(entry)
    assert [g["run_id"] for g in generations] == ["run5", "run4", "run3", "run2", "run1"]
    assert "chain cut" in generations[-1]["note"]


def test_a_replaced_or_deleted_parent_keeps_what_the_child_read(tmp_path):
    grandparent = fake_run(tmp_path, "gp", None)
    parent = fake_run(tmp_path, "p", parent_entry(grandparent))
    child = fake_run(tmp_path, "c", parent_entry(parent))
    read = parent_entry(parent)["digest"]
    parent.write_bytes(b"another model")  # replaced after the child started from it
    entry = parent_entry(child)["parent"]
    assert entry["digest"] == read and "changed since run c read it" in entry["note"]
    assert entry["parent"]["run_id"] == "gp"  # the recorded chain goes on
    parent.unlink()
    entry = parent_entry(child)["parent"]
    assert entry["digest"] == read and "is gone" in entry["note"] and entry["parent"]["run_id"] == "gp"


@pytest.mark.parametrize("content", [[1, 2], {"run_id": 7, "lineage": [1]}, {"lineage": {"parent": {"path": 3}}}])
def test_a_malformed_record_is_a_partial_entry(tmp_path, content):
    checkpoint = fake_run(tmp_path, "run", None)
    (tmp_path / "run" / "step.json").write_text(json.dumps(content))
    entry = parent_entry(checkpoint)
    assert entry["digest"] == sha256_file(checkpoint) and entry["parent"] is None
    assert entry["run_id"] is None or isinstance(entry["run_id"], str)


class _Trap:
    def __reduce__(self):
        return (Path.touch, (Path(_Trap.marker),))


def test_describing_a_parent_never_unpickles_it(tmp_path):
    _Trap.marker = str(tmp_path / "executed")
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(pickle.dumps(_Trap()))
    entry = parent_entry(checkpoint)
    assert entry["digest"] == sha256_file(checkpoint) and not (tmp_path / "executed").exists()
