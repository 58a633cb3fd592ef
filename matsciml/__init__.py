"""matsciml: graph neural networks and interatomic potentials for materials data."""

__version__ = "0.1.0"
