"""An ASE calculator around a trained task: energies, forces and stress for any ``Atoms``.

:class:`MatSciMLCalculator` turns the Atoms into a batch the way training data were turned
(:func:`matsciml.data.structures.batch_from_atoms` with the cutoff and neighbour cap recorded in
the task, the model's representation) and runs the task's forward pass, so it predicts what
``predict`` would. Forces are ``-dE/dx`` and stress ``(1/V) dE/dstrain`` (ASE's convention), both
from the task's single autograd pass.

By default the graph holds every neighbour within the cutoff. A task trained with a neighbour cap
(``data.max_neighbors``, e.g. the OC20 baselines' 50) is evaluated with that cap, with a warning:
its energy jumps where the last kept and the first dropped neighbour swap rank. Pass
``max_neighbors=None`` to evaluate the same model on every neighbour (a smooth surface, for
dynamics that must conserve energy), or an integer for another cap.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any, Literal, Self

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from matsciml.artifacts.checkpoints import Which
from matsciml.data.errors import DataError
from matsciml.data.min_distance import DEFAULT_MIN_DISTANCE, check_min_distance_setting
from matsciml.data.structures import batch_from_atoms
from matsciml.tasks.base import AtomisticTask

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: ``max_neighbors`` value meaning "as the task was trained" (its recorded graph; no cap if none)
TRAINED = "trained"
MaxNeighbors = int | None | Literal["trained"]


def inference_graph(task: AtomisticTask, max_neighbors: MaxNeighbors = TRAINED) -> dict[str, Any]:
    """Keyword arguments of :func:`~matsciml.data.structures.batch_from_atoms` for ``task``.

    Graph models get the cutoff recorded at training (the model's cutoff for tasks without a
    record) and the recorded neighbour cap unless ``max_neighbors`` overrides it; tasks saved
    before the record existed get no cap. Warns when the resulting graph is capped.

    Args:
        task: the trained task.
        max_neighbors: ``"trained"`` (default): as recorded; ``None``: every neighbour within the
            cutoff; an integer: that cap.
    """
    if not (
        max_neighbors is None
        or max_neighbors == TRAINED
        or (isinstance(max_neighbors, int) and not isinstance(max_neighbors, bool) and max_neighbors >= 1)
    ):
        raise ValueError(f"max_neighbors must be 'trained', None or a positive integer, got {max_neighbors!r}")
    model = task.model
    if model.representation != "graph":
        return {"representation": model.representation}
    recorded = getattr(task, "graph", None) or {}
    cutoff = recorded.get("cutoff", getattr(model, "cutoff", None))
    cap = recorded.get("max_neighbors") if max_neighbors == TRAINED else max_neighbors
    if cap is not None:
        warnings.warn(
            f"matsciml: the radius graph keeps only the {cap} nearest neighbours per atom "
            f"(cutoff {cutoff} Å): energies and forces jump where neighbours swap rank; pass "
            "max_neighbors=None (CLI: --max-neighbors 0) for a continuous surface",
            stacklevel=3,
        )
    graph = {"representation": "graph", "max_neighbors": cap}
    if cutoff is not None:
        graph["cutoff"] = cutoff
    return graph


def load_task(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    trusted_modules: Iterable[str] | None = None,
    which: Which | None = None,
) -> AtomisticTask:
    """The task saved in a Lightning checkpoint (CLI or Python), loaded weights-only, in eval mode.

    The task is built as for exports (:func:`matsciml.artifacts.export.task_from_checkpoint`): its task and
    model classes only from ``matsciml`` or ``trusted_modules`` (checked before any import, see
    :mod:`matsciml.artifacts.trust`).

    Args:
        checkpoint: a ``.ckpt`` from ``matsciml fit`` or a Trainer, or a run folder of ``matsciml fit``.
        device: where to put the weights.
        trusted_modules: modules besides ``matsciml`` your own task or model classes come from.
        which: for a run folder, ``"best"`` (``checkpoints/best.ckpt``) or ``"last"`` (default).
    """
    from matsciml.artifacts.export import task_from_checkpoint

    return task_from_checkpoint(checkpoint, trusted_modules, which=which).to(device).eval()


class FromTrainedTask:
    """``from_checkpoint`` and ``from_package`` for the classes built as ``cls(task, device=device, **kwargs)``:
    the ASE calculator here and the torch-sim model (:mod:`matsciml.integrations.torch_sim`)."""

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        trusted_modules: Iterable[str] | None = None,
        which: Which | None = None,
        **kwargs: Any,
    ) -> Self:
        """For the task in a Lightning checkpoint or a run folder's ``which`` (``"best"`` or ``"last"``)
        checkpoint (loaded weights-only; classes from ``matsciml`` or ``trusted_modules`` only, see
        :func:`load_task`); ``kwargs`` go to the constructor."""
        task = load_task(path, device=device, trusted_modules=trusted_modules, which=which)
        return cls(task, device=device, **kwargs)

    @classmethod
    def from_package(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        trusted_modules: Iterable[str] | None = None,
        **kwargs: Any,
    ) -> Self:
        """For an exported model package (``matsciml export``); ``kwargs`` go to the constructor."""
        from matsciml.artifacts.export import load_model

        return cls(load_model(path, device=device, trusted_modules=trusted_modules), device=device, **kwargs)


class MatSciMLCalculator(FromTrainedTask, Calculator):
    """ASE calculator for an :class:`~matsciml.tasks.AtomisticTask` (S2EF or IS2RE).

    Args:
        task: the trained task (``load_task`` / :meth:`from_checkpoint` / :meth:`from_package`).
        device: where to run it.
        dtype: ``"float32"`` (as trained) or ``"float64"`` (the model's weights cast up; for
            finite-difference checks and tight relaxations).
        max_neighbors: neighbour cap of the radius graph: ``"trained"`` (default) as recorded in
            the task (no cap unless it was trained with one; a cap warns), ``None`` for every
            neighbour within the cutoff (a smooth energy surface), or an integer.
        min_distance: refuse Atoms with two atoms closer than this, in Å, periodic images included
            (``0``: no check), as data loading does (:mod:`matsciml.data.min_distance`).

    Atoms holding elements the task was not trained on (``task.species``, recorded from the
    training data) are refused with a :class:`~matsciml.data.errors.DataError` naming them: the
    model has never seen them and would answer with an untrained embedding.

    Properties: ``energy`` (and ``free_energy``, the same); ``forces`` for S2EF tasks that
    regress forces; ``stress`` for tasks trained with ``regress_stress``. An IS2RE task predicts
    the relaxed adsorption energy of the initial structure, which has no forces.
    """

    def __init__(
        self,
        task: AtomisticTask,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        max_neighbors: MaxNeighbors = TRAINED,
        min_distance: float = DEFAULT_MIN_DISTANCE,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device)
        self.task = task.to(device=self.device, dtype=self.dtype).eval()
        self.graph = inference_graph(task, max_neighbors)  # warns once here if capped, not per call
        self.min_distance = check_min_distance_setting(min_distance)
        self.species = trained_species(task)
        properties = ["energy", "free_energy"]
        if getattr(task, "regress_forces", False):
            properties.append("forces")
        if getattr(task, "regress_stress", False):
            properties.append("stress")
        self.implemented_properties = properties

    def calculate(
        self, atoms: Atoms | None = None, properties: list[str] | None = None, system_changes: list[str] = all_changes
    ) -> None:
        properties = properties or ["energy"]
        missing = [p for p in properties if p not in self.implemented_properties]
        if missing:
            raise PropertyNotImplementedError(
                f"{type(self.task).__name__} does not predict {', '.join(missing)} "
                f"(it predicts {', '.join(self.implemented_properties)})"
            )
        super().calculate(atoms, properties, system_changes)
        self._check_species(self.atoms)
        batch = batch_from_atoms(self.atoms, dtype=self.dtype, min_distance=self.min_distance, **self.graph).to(
            self.device
        )
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

    def _check_species(self, atoms: Atoms) -> None:
        check_species(self.species, atoms)


def trained_species(task: AtomisticTask) -> set[int] | None:
    """The atomic numbers ``task`` was trained on (``None`` for a task saved without them)."""
    return None if getattr(task, "species", None) is None else {int(z) for z in task.species}


def check_species(
    species: set[int] | None, atoms: Atoms, source: str | os.PathLike = "<atoms>", index: int | None = None
) -> None:
    """Refuse elements outside ``species`` (the training data's; ``None``: not recorded, all pass).

    Raises:
        DataError: naming the unseen elements and the trained ones.
    """
    if species is None:
        return
    unseen = sorted({int(z) for z in atoms.numbers} - species)
    if unseen:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unseen)
        trained = ", ".join(chemical_symbols[z] for z in sorted(species))
        raise DataError(
            source,
            f"{atoms.get_chemical_formula()} holds {names}, which the model never saw in training; it was "
            f"trained on {trained} only. Use a model trained on these elements",
            index,
        )
