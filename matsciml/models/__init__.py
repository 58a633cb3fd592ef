"""Energy models: each maps a :class:`~matsciml.data.Batch` to per-structure energies."""

from matsciml.models.base import AbstractEnergyModel
from matsciml.models.egnn import EGNN
from matsciml.models.gala import Gala
from matsciml.models.mace import MACE
from matsciml.models.megnet import MegNet
from matsciml.models.nequip import NequIP

__all__ = ["EGNN", "MACE", "AbstractEnergyModel", "Gala", "MegNet", "NequIP"]
