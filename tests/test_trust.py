"""Loading never imports a module the file names: checkpoints, packages, the calculator and the CLI
resolve classes through matsciml.artifacts.trust, which refuses an untrusted module before importing it."""

import os
import subprocess
import sys
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch

from matsciml.artifacts.export import export_package, load_model
from matsciml.artifacts.trust import (
    ENV_VAR,
    UntrustedClassError,
    check_trusted,
    pop_trust_flags,
    resolve_class,
    trusting,
)
from matsciml.cli.app import main
from matsciml.data import S2EFDataModule
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.tasks import S2EFTask
from tests.helpers.training import quiet_trainer, tiny_egnn

ROOT = Path(__file__).resolve().parents[1]
MODULE = "user_models_marker"
# a user's model package: importing it leaves a marker file, so a test can see whether it was imported
SOURCE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from matsciml.models import EGNN
from matsciml.tasks import S2EFTask


class MyEGNN(EGNN):
    pass


class MyTask(S2EFTask):
    pass
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``user_models_marker`` on sys.path (not imported); yields the marker it writes when imported."""
    folder, marker = tmp_path / "site", tmp_path / "imported.marker"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(ENV_VAR, raising=False)
    sys.modules.pop(MODULE, None)
    yield marker
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real S2EF checkpoint of a tiny EGNN from a one-batch Trainer fit."""
    torch.manual_seed(0)
    task = S2EFTask(tiny_egnn(), lr=3e-3)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=4, shuffle=False))
    path = tmp_path_factory.mktemp("trust") / "s2ef.ckpt"
    trainer.save_checkpoint(path)
    return path


def naming_user_classes(checkpoint: Path, out: Path, task: bool = False) -> Path:
    """``checkpoint`` with its model (and task) class paths pointing into the user module."""
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["model"]["class_path"] = f"{MODULE}.MyEGNN"
    if task:
        content["hyper_parameters"]["_class_path"] = f"{MODULE}.MyTask"
    torch.save(content, out)
    return out


def refused_unimported(marker: Path, call, *args, **kwargs) -> None:
    with pytest.raises(UntrustedClassError, match=rf"'{MODULE}', which is not trusted.*--trust-module {MODULE}"):
        call(*args, **kwargs)
    assert not marker.exists() and MODULE not in sys.modules


def test_resolution_checks_before_importing(user_module):
    for path in ("os.system", "antigravity.Model", "matsciml_evil.Model", "matsciml", "a b.C", 3):
        with pytest.raises(UntrustedClassError):
            check_trusted(path)
    assert "antigravity" not in sys.modules  # importing it would open a browser
    refused_unimported(user_module, resolve_class, f"{MODULE}.MyEGNN", torch.nn.Module)
    with pytest.raises(UntrustedClassError, match="not a S2EFTask subclass"):  # trusted, but the wrong kind
        resolve_class(f"{MODULE}.MyEGNN", S2EFTask, [MODULE])
    assert user_module.exists()
    assert resolve_class(f"{MODULE}.MyTask", S2EFTask, [MODULE]).__name__ == "MyTask"
    with pytest.raises(TypeError, match="list of module names"):
        check_trusted("matsciml.models.EGNN", MODULE)


@pytest.mark.parametrize("task_class", [False, True], ids=["model", "model+task"])
def test_load_task_and_calculator_refuse_then_trust(checkpoint, tmp_path, user_module, task_class):
    path = naming_user_classes(checkpoint, tmp_path / "user.ckpt", task=task_class)
    refused_unimported(user_module, load_task, path)
    refused_unimported(user_module, MatSciMLCalculator.from_checkpoint, path)
    # Lightning's own loader builds the task through the same check (AtomisticTask.__init__ -> from_spec)
    refused_unimported(user_module, S2EFTask.load_from_checkpoint, path, weights_only=True)
    task = load_task(path, trusted_modules=[MODULE])
    assert user_module.exists() and type(task.model).__name__ == "MyEGNN"
    assert type(task).__name__ == ("MyTask" if task_class else "S2EFTask")
    reference = load_task(checkpoint)
    assert all(
        torch.equal(a, b) for a, b in zip(task.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    calc = MatSciMLCalculator.from_checkpoint(path, trusted_modules=[f"{MODULE}"])
    assert type(calc.task.model).__name__ == "MyEGNN"


@pytest.mark.parametrize("name", ["model.msml", "model.zip"])
def test_packages_refuse_then_trust(checkpoint, tmp_path, user_module, name):
    path = naming_user_classes(checkpoint, tmp_path / "user.ckpt")
    refused_unimported(user_module, export_package, path, tmp_path / "refused.msml")
    assert not (tmp_path / "refused.msml").exists()
    package = export_package(path, tmp_path / name, trusted_modules=[MODULE])
    user_module.unlink()
    sys.modules.pop(MODULE)
    refused_unimported(user_module, load_model, package)
    refused_unimported(user_module, MatSciMLCalculator.from_package, package)
    assert type(load_model(package, trusted_modules=[MODULE]).model).__name__ == "MyEGNN"
    assert user_module.exists()


def test_the_environment_variable_reaches_child_processes(user_module):
    """DDP ranks are new processes that re-run the command line: the trust must live in the environment."""
    code = (
        f"from matsciml.artifacts.trust import resolve_class; print(resolve_class('{MODULE}.MyEGNN', object).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with trusting([MODULE]):
        env_inside = {**env, ENV_VAR: os.environ[ENV_VAR]}
        assert check_trusted(f"{MODULE}.sub.Model") == f"{MODULE}.sub"
    assert ENV_VAR not in os.environ  # restored: one command cannot widen the next one's trust
    done = subprocess.run([sys.executable, "-c", code], env=env_inside, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "MyEGNN", done.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "not trusted" in refused.stderr


def test_trust_flags_are_taken_out_of_the_lightning_command_line():
    argv = ["validate", "--trust-module", "a", "--config", "x.yaml", "--trust-module=b.c"]
    assert pop_trust_flags(argv) == (["validate", "--config", "x.yaml"], ["a", "b.c"])
    with pytest.raises(ArgumentError, match="needs a module name"):
        pop_trust_flags(["fit", "--trust-module"])


QUICK = [
    "--config",
    "configs/devset/s2ef-egnn.yaml",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint from a real (one-batch) ``matsciml fit``, and the save_dir of its run."""
    save_dir = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert (
            main(
                [
                    "fit",
                    *QUICK,
                    "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=1",
                    f"--trainer.logger.init_args.save_dir={save_dir}",
                ]
            )
            == 0
        )
    return save_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", save_dir


# validate --ckpt_path logs to a new version folder; Lightning notes the checkpoint folder moved
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_cli_validate_ckpt_path_refuses_then_trusts(cli_checkpoint, tmp_path, user_module, monkeypatch, capsys):
    path = naming_user_classes(cli_checkpoint[0], tmp_path / "user.ckpt", task=True)
    monkeypatch.chdir(ROOT)
    command = ["validate", *QUICK, f"--ckpt_path={path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "not trusted" in err and f"--trust-module {MODULE}" in err
    assert not user_module.exists() and MODULE not in sys.modules
    assert main([*command, "--trust-module", MODULE]) == 0
    assert user_module.exists() and ENV_VAR not in os.environ


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_cli_test_and_predict_ckpt_path_refuse_unimported(
    subcommand, cli_checkpoint, tmp_path, user_module, monkeypatch, capsys
):
    path = naming_user_classes(cli_checkpoint[0], tmp_path / "user.ckpt", task=True)
    monkeypatch.chdir(ROOT)
    assert main([subcommand, *QUICK, f"--ckpt_path={path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    assert "not trusted" in capsys.readouterr().err
    assert not user_module.exists() and MODULE not in sys.modules


class Payload:
    """Any object torch.save must pickle: a weights-only load refuses it."""


def test_cli_refuses_a_checkpoint_holding_pickled_objects_in_one_line(cli_checkpoint, tmp_path, monkeypatch, capsys):
    content = torch.load(cli_checkpoint[0], weights_only=True)
    content["payload"] = Payload()
    path = tmp_path / "pickled.ckpt"
    torch.save(content, path)
    monkeypatch.chdir(ROOT)
    assert main(["validate", *QUICK, f"--ckpt_path={path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matsciml: error: ") and "not a weights-only checkpoint" in err and "Traceback" not in err


def test_cli_export_and_predict_structures_take_trust_module(checkpoint, tmp_path, user_module, capsys):
    path = naming_user_classes(checkpoint, tmp_path / "user.ckpt")
    assert main(["export", str(path), "--out", str(tmp_path / "m.msml")]) == 2
    assert "not trusted" in capsys.readouterr().err and not user_module.exists()
    assert main(["export", str(path), "--out", str(tmp_path / "m.msml"), "--trust-module", MODULE]) == 0
    user_module.unlink()
    sys.modules.pop(MODULE)
    structures = tmp_path / "in.xyz"
    from ase.build import bulk
    from ase.io import write

    write(structures, bulk("Cu", cubic=True))
    predict = ["predict-structures", str(tmp_path / "m.msml"), str(structures), "--out", str(tmp_path / "out.xyz")]
    assert main(predict) == 2 and not user_module.exists()
    assert main([*predict, "--trust-module", MODULE]) == 0 and (tmp_path / "out.xyz").is_file()
