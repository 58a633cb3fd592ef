"""Energy models: each maps a :class:`~matsciml.data.Batch` to per-structure energies."""

from matsciml.models.base import AbstractEnergyModel
from matsciml.models.egnn import EGNN

__all__ = ["EGNN", "AbstractEnergyModel"]
