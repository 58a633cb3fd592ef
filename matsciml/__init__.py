"""matsciml: graph neural networks and interatomic potentials for materials data."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # matsciml.load_model without making `import matsciml` import torch: loaded on first access
    if name == "load_model":
        from matsciml.export import load_model

        return load_model
    raise AttributeError(f"module 'matsciml' has no attribute {name!r}")
