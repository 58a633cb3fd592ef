"""Fuzzing the checkpoint loaders: trust.check_checkpoint_classes (fit --ckpt_path) and calculators.load_task."""

import pytest
import torch
from helpers.fuzz import TARGETS, _model_files, run
from helpers.mutations import fuzz_inputs
from hypothesis import given, settings

from matsciml.artifacts.export import ExportError
from matsciml.artifacts.trust import UntrustedClassError, check_checkpoint_classes
from matsciml.integrations.calculators import load_task

TARGET = TARGETS["checkpoint"]


@settings(settings.get_profile("fuzz"), max_examples=80)
@given(data=fuzz_inputs(TARGET.seeds()))
def test_any_input_loads_or_raises_a_project_error(data, workdir):
    run(TARGET, data, workdir)


def checkpoint(tmp_path, **changes):
    value = torch.load(_seed(tmp_path), weights_only=True)
    value.update(changes)
    path = tmp_path / "changed.ckpt"
    torch.save(value, path)
    return path


def _seed(tmp_path):
    path = tmp_path / "seed.ckpt"
    path.write_bytes(_model_files()["model.ckpt"])
    return path


@pytest.mark.parametrize("cut", [50, 2000, -50])
def test_truncated_checkpoints_are_refused_with_the_file_named(tmp_path, cut):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(_model_files()["model.ckpt"][:cut])
    with pytest.raises(UntrustedClassError, match=f"{path}: not a weights-only checkpoint"):
        check_checkpoint_classes(path)
    with pytest.raises(ExportError, match=f"{path} is not a readable PyTorch checkpoint"):
        load_task(path)


def test_a_state_dict_that_is_not_tensors_is_refused(tmp_path):
    path = checkpoint(tmp_path, state_dict={"weight": 1.5})
    with pytest.raises(ExportError, match=f"{path}: state_dict does not hold a {{name: tensor}} state dict"):
        load_task(path)


def test_a_spec_larger_than_the_checkpoints_weights_is_refused_before_it_is_built(tmp_path):
    hparams = torch.load(_seed(tmp_path), weights_only=True)["hyper_parameters"]
    hparams["model"]["init_args"]["hidden"] = 100_000
    path = checkpoint(tmp_path, hyper_parameters=hparams)
    with pytest.raises(ExportError, match=f"{path}: hyper_parameters: the model it describes is larger"):
        load_task(path)
