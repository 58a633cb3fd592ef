"""Import paths from before the package root was grouped into subpackages, kept working.

``import matsciml.calculators`` (or ``from matsciml.runs import load``) gives the very module object
now at its new path, so attributes, ``isinstance`` and monkeypatching behave as before, and class
paths saved in old checkpoints and configs (``matsciml.loggers.ResumableCSVLogger``) still resolve.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module path -> where it lives now
MOVED = {
    "matsciml.accelerators": "matsciml.trainer.accelerators",
    "matsciml.batch_prediction": "matsciml.integrations.batch_prediction",
    "matsciml.build_budget": "matsciml.artifacts.build_budget",
    "matsciml.calculators": "matsciml.integrations.calculators",
    "matsciml.checkpoint_io": "matsciml.trainer.checkpoint_io",
    "matsciml.checkpoints": "matsciml.artifacts.checkpoints",
    "matsciml.cli_args": "matsciml.cli.args",
    "matsciml.cli_devset": "matsciml.cli.devset",
    "matsciml.cli_errors": "matsciml.cli.errors",
    "matsciml.cli_runs": "matsciml.cli.runs",
    "matsciml.export": "matsciml.artifacts.export",
    "matsciml.loggers": "matsciml.trainer.loggers",
    "matsciml.model_loading": "matsciml.artifacts.model_loading",
    "matsciml.partials": "matsciml.records.partials",
    "matsciml.plots": "matsciml.records.plots",
    "matsciml.provenance": "matsciml.records.provenance",
    "matsciml.resume": "matsciml.trainer.resume",
    "matsciml.runs": "matsciml.records.runs",
    "matsciml.slurm": "matsciml.trainer.slurm",
    "matsciml.step_recorder": "matsciml.records.step_recorder",
    "matsciml.training_cli": "matsciml.cli.training",
    "matsciml.trust": "matsciml.artifacts.trust",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of an old path with the module at its new one."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # the import system keeps an existing module's __name__ and __spec__, so the old name
        # becomes a second key for the same object in sys.modules
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its new name."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
