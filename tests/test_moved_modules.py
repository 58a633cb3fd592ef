"""Import paths from before the package root was grouped into subpackages still work, as the same modules."""

import importlib
import importlib.resources
import subprocess
import sys

import pytest

from matsciml._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_module_at_its_new_path(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_from_imports_and_attribute_access_on_old_paths():
    import matsciml.runs
    from matsciml.calculators import MatSciMLCalculator
    from matsciml.runs import load

    from matsciml.integrations.calculators import MatSciMLCalculator as moved

    assert MatSciMLCalculator is moved
    assert load is matsciml.runs.load
    assert matsciml.runs.__name__ == "matsciml.records.runs"


def test_an_old_class_path_in_a_saved_config_resolves():
    """Checkpoints and config.yaml files written before the move name classes by their old module."""
    from matsciml.artifacts.trust import resolve_class
    from matsciml.trainer.loggers import CSVLogger

    assert resolve_class("matsciml.loggers.CSVLogger", object) is CSVLogger


def test_a_fresh_interpreter_imports_an_old_path_first():
    """Nothing else imported beforehand: the finder is installed by ``import matsciml`` itself."""
    code = "import matsciml.provenance as p, sys; print(p.__name__, 'matsciml.records.provenance' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["matsciml.records.provenance", "True"]


def test_the_package_root_holds_only_grouped_packages_and_a_few_modules():
    import matsciml

    root = importlib.resources.files(matsciml)
    loose = sorted(p.name for p in root.iterdir() if p.name.endswith(".py"))
    assert loose == ["__init__.py", "__main__.py", "_moved.py", "atomic.py"]
