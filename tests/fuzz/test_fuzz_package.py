"""Fuzzing the model package loader (export.load_model): damaged zips, model.json and weights.pt."""

import io
import json
import zipfile

import pytest
import torch
from helpers.fuzz import TARGETS, _model_files, run
from helpers.mutations import fuzz_inputs
from hypothesis import given, settings

from matsciml.artifacts.export import MODEL_FILE, TORCH_FILE, ExportError, load_model


@pytest.mark.parametrize("name", ["package-zip", "package-json", "package-weights"])
def test_any_input_loads_or_raises_a_project_error(name, workdir):
    target = TARGETS[name]

    @settings(settings.get_profile("fuzz"), max_examples=60)
    @given(data=fuzz_inputs(target.seeds()))
    def check(data):
        run(target, data, workdir)

    check()


def folder_package(tmp_path, **replaced: bytes):
    files = {MODEL_FILE: _model_files()[MODEL_FILE], TORCH_FILE: _model_files()[TORCH_FILE], **replaced}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_a_zip_with_a_bad_crc_names_the_package(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(MODEL_FILE, _model_files()[MODEL_FILE])
        archive.writestr(TORCH_FILE, _model_files()[TORCH_FILE])
    data = bytearray(buffer.getvalue())
    data[data.index(b'"format"')] ^= 1  # one flipped bit inside model.json: zipfile raised BadZipFile
    path = tmp_path / "model.zip"
    path.write_bytes(data)
    with pytest.raises(ExportError, match=f"{path} is a damaged zip: Bad CRC-32"):
        load_model(path)


@pytest.mark.parametrize("cut", [100, 1000, -100])
def test_truncated_weights_name_the_file(tmp_path, cut):
    # torch's reader raised IndexError / KeyError / struct.error for some of these
    weights = _model_files()[TORCH_FILE][:cut]
    with pytest.raises(ExportError, match=f"{tmp_path}/{TORCH_FILE} is not a weights-only tensor file"):
        load_model(folder_package(tmp_path, **{TORCH_FILE: weights}))


def description(**changes) -> bytes:
    value = json.loads(_model_files()[MODEL_FILE])
    for path, setting in changes.items():
        where, key = path.split("__")
        (value["task"] if where == "task" else value["model"])["init_args"][key] = setting
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"task__lr": 0}, "lr must be positive"),  # the task's own ValueError escaped
        ({"model__num_layers": 0}, "must be at least 1"),
        ({"model__hidden": -1}, "negative dimension"),  # torch's RuntimeError escaped
    ],
)
def test_specs_that_do_not_build_are_export_errors(tmp_path, changes, reason):
    with pytest.raises(ExportError, match=f"{MODEL_FILE}: S2EFTask cannot be built: .*{reason}"):
        load_model(folder_package(tmp_path, **{MODEL_FILE: description(**changes)}))


def test_a_spec_far_larger_than_its_weights_is_refused_before_it_is_built(tmp_path):
    # the fuzzer's hidden=99999999999 ran out of memory or time; here hidden=100000, some
    # 50 MB, which the loader used to build (and initialise) before comparing with the weights
    package = folder_package(tmp_path, **{MODEL_FILE: description(model__hidden=100_000)})
    with pytest.raises(ExportError, match="model.json: the model it describes is larger than its weights"):
        load_model(package)


def test_valid_packages_still_load(tmp_path, workdir):
    for name in ("package-zip", "package-json", "package-weights"):
        for seed in TARGETS[name].seeds():
            assert run(TARGETS[name], seed, workdir) is None
    task = load_model(folder_package(tmp_path))
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in torch.load(tmp_path / TORCH_FILE).items())
