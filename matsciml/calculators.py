"""An ASE calculator around a trained task: energies, forces and stress for any ``Atoms``.

:class:`MatSciMLCalculator` turns the Atoms into a batch the way training data were turned
(:func:`matsciml.data.structures.batch_from_atoms`: the model's cutoff, the data's neighbour cap,
the model's representation) and runs the task's forward pass, so it predicts what ``predict``
would. Forces are ``-dE/dx`` and stress ``(1/V) dE/dstrain`` (ASE's convention), both from the
task's single autograd pass.

The neighbour cap (50 per atom by default, as in training) makes the energy jump where the
ranking of the 50th and 51st neighbour swaps; for dynamics that must conserve energy, pass
``max_neighbors=None``, which evaluates the same model on every neighbour within the cutoff.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from matsciml.data.neighbors import DEFAULT_MAX_NEIGHBORS
from matsciml.data.structures import batch_from_atoms
from matsciml.tasks.base import AtomisticTask

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_task(checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
              trusted_modules: Iterable[str] | None = None) -> AtomisticTask:
    """The task saved in a Lightning checkpoint (CLI or Python), loaded weights-only, in eval mode.

    The task is built as for exports (:func:`matsciml.export.task_from_checkpoint`): its task and
    model classes only from ``matsciml`` or ``trusted_modules`` (checked before any import, see
    :mod:`matsciml.trust`).

    Args:
        checkpoint: a ``.ckpt`` from ``matsciml fit`` or a Trainer.
        device: where to put the weights.
        trusted_modules: modules besides ``matsciml`` your own task or model classes come from.
    """
    from matsciml.export import task_from_checkpoint

    return task_from_checkpoint(checkpoint, trusted_modules).to(device).eval()


class MatSciMLCalculator(Calculator):
    """ASE calculator for an :class:`~matsciml.tasks.AtomisticTask` (S2EF or IS2RE).

    Args:
        task: the trained task (``load_task`` / :meth:`from_checkpoint` / :meth:`from_package`).
        device: where to run it.
        dtype: ``"float32"`` (as trained) or ``"float64"`` (the model's weights cast up; for
            finite-difference checks and tight relaxations).
        max_neighbors: neighbour cap of the radius graph; the training data's default, or
            ``None`` for every neighbour within the cutoff (a smooth energy surface).

    Properties: ``energy`` (and ``free_energy``, the same); ``forces`` for S2EF tasks that
    regress forces; ``stress`` for tasks trained with ``regress_stress``. An IS2RE task predicts
    the relaxed adsorption energy of the initial structure, which has no forces.
    """

    def __init__(self, task: AtomisticTask, device: str | torch.device = "cpu", dtype: str = "float32",
                 max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS, **kwargs: Any):
        super().__init__(**kwargs)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.task = task.to(device=self.device, dtype=self.dtype).eval()
        self.max_neighbors = max_neighbors
        model = task.model
        self.cutoff = getattr(model, "cutoff", None)
        self.representation = model.representation
        properties = ["energy", "free_energy"]
        if getattr(task, "regress_forces", False):
            properties.append("forces")
        if getattr(task, "regress_stress", False):
            properties.append("stress")
        self.implemented_properties = properties

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        trusted_modules: Iterable[str] | None = None, **kwargs: Any) -> MatSciMLCalculator:
        """A calculator for the task in a Lightning checkpoint (loaded weights-only; classes from
        ``matsciml`` or ``trusted_modules`` only, see :func:`load_task`)."""
        return cls(load_task(path, device=device, trusted_modules=trusted_modules), device=device, **kwargs)

    @classmethod
    def from_package(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                     trusted_modules: Iterable[str] | None = None, **kwargs: Any) -> MatSciMLCalculator:
        """A calculator for an exported model package (``matsciml export``)."""
        from matsciml.export import load_model

        return cls(load_model(path, device=device, trusted_modules=trusted_modules), device=device, **kwargs)

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        properties = properties or ["energy"]
        missing = [p for p in properties if p not in self.implemented_properties]
        if missing:
            raise PropertyNotImplementedError(
                f"{type(self.task).__name__} does not predict {', '.join(missing)} "
                f"(it predicts {', '.join(self.implemented_properties)})")
        super().calculate(atoms, properties, system_changes)
        graph = {"cutoff": self.cutoff} if self.representation == "graph" else {}
        batch = batch_from_atoms(self.atoms, max_neighbors=self.max_neighbors, dtype=self.dtype,
                                 representation=self.representation, **graph).to(self.device)
        out = self.task(batch)  # forces and stress need autograd: no torch.no_grad here
        energy = float(out["energy"].detach()[0])
        self.results = {"energy": energy, "free_energy": energy}
        if "forces" in out:
            self.results["forces"] = out["forces"].detach().cpu().double().numpy()
        if "stress" in out:
            stress = out["stress"].detach().cpu().double().numpy()[0]
            # ASE's Voigt order: xx, yy, zz, yz, xz, xy
            self.results["stress"] = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
        if not all(np.all(np.isfinite(v)) for v in self.results.values()):
            raise FloatingPointError(f"the model returned non-finite results for {self.atoms.get_chemical_formula()}")
