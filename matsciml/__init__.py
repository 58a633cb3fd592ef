"""matsciml: graph neural networks and interatomic potentials for materials data."""

from matsciml import _moved

__version__ = "0.1.0"
_moved.install()  # old module paths (matsciml.calculators, matsciml.runs, ...) keep working


def __getattr__(name: str):
    # matsciml.load_model without making `import matsciml` import torch: loaded on first access
    if name == "load_model":
        from matsciml.artifacts.export import load_model

        return load_model
    raise AttributeError(f"module 'matsciml' has no attribute {name!r}")
