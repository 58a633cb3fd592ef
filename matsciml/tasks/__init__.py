"""Lightning tasks: training logic, losses, normalisation and metrics around an energy model."""

from matsciml.tasks.base import AtomisticTask
from matsciml.tasks.is2re import IS2RELitModule, IS2RETask
from matsciml.tasks.normalizers import EnergyNormalizer
from matsciml.tasks.s2ef import S2EFLitModule, S2EFTask
from matsciml.trainer.accelerators import register_xpu

# accelerator="xpu" for any Trainer that trains a task (Lightning has no XPU accelerator of its own)
register_xpu()

__all__ = ["AtomisticTask", "EnergyNormalizer", "IS2RELitModule", "IS2RETask", "S2EFLitModule", "S2EFTask"]
