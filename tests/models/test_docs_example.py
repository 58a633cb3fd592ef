"""The model written in docs/models.md runs and passes the whole physics battery."""

import re
from pathlib import Path

from helpers.physics import PhysicsBattery

from matsciml.cli.app import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _doc_model_class():
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(source, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["GaussianPairModel"]


def test_the_example_is_short():
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len(source.strip().splitlines()) < 40


class TestDocsExample(PhysicsBattery):
    def make_model(self):
        return _doc_model_class()(cutoff=self.cutoff)


def _equivariant_example() -> str:
    (source,) = [s for s in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "Interaction(" in s]
    return source


def test_the_equivariant_example_fits_in_a_page():
    assert len(_equivariant_example().strip().splitlines()) < 45


class TestDocsEquivariantExample(PhysicsBattery):
    def make_model(self):
        namespace: dict = {}
        exec(compile(_equivariant_example(), str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
        return namespace["TinyEquivariantModel"](num_features=4, cutoff=self.cutoff)


def test_the_example_trains_through_the_cli_with_the_shipped_config(tmp_path, monkeypatch, capsys):
    source = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    (tmp_path / "mymodels.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(DOC.parents[1])
    command = re.search(r"matsciml (fit --config \S+ --model\.init_args\.model=\S+)", DOC.read_text()).group(1)
    quick = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    assert main([*command.split(), *quick]) == 0
    assert "force MAE" in capsys.readouterr().out
