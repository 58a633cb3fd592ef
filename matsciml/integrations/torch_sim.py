"""A torch-sim model around a trained task: batched relaxation and MD of many structures at once.

:class:`MatSciMLModel` is a ``torch_sim.models.interface.ModelInterface``: ``torch_sim.optimize``,
``torch_sim.integrate`` and the optimisers / integrators call it with a ``SimState`` holding many
systems, and it answers with one forward pass of the task over all of them. The batch is built
exactly as :class:`~matsciml.integrations.calculators.MatSciMLCalculator` builds it for one
``Atoms`` (:func:`~matsciml.data.structures.batch_from_atoms` with the task's recorded cutoff and
neighbour cap, :func:`~matsciml.integrations.calculators.inference_graph`), so both give the same
energies, forces and stress.

Units are torch-sim's metal units, which are also ASE's: energies in eV, forces in eV/Å, stress in
eV/Å^3 as ``(1/V) dE/dstrain`` (positive under tension; torch-sim's cell optimisers take the virial
as ``-V * stress``, as ASE's filters do), time in ``Å sqrt(amu/eV)`` (``ase.units.fs`` is one fs).

torch-sim is an optional extra (``pip install 'matsciml[torchsim]'``): ``import matsciml`` never
imports it; importing this module without it raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from ase import Atoms

from matsciml.data.min_distance import DEFAULT_MIN_DISTANCE, check_min_distance_setting
from matsciml.data.structures import batch_from_atoms
from matsciml.integrations.calculators import (
    TRAINED,
    FromTrainedTask,
    MaxNeighbors,
    check_species,
    inference_graph,
    trained_species,
)
from matsciml.tasks.base import AtomisticTask

#: what to install when torch-sim is missing
EXTRA = "pip install 'matsciml[torchsim]'  (the torch-sim-atomistic package, >= 0.3)"

try:
    with warnings.catch_warnings():
        # torch-sim 0.3 decorates with torch.jit.script and imports vesin.torch, both deprecated
        # in the installed versions; the deprecations are torch-sim's to fix, not the user's.
        warnings.simplefilter("ignore", DeprecationWarning)
        import torch_sim as ts
        from torch_sim.models.interface import ModelInterface
except ImportError as err:
    raise ImportError(f"matsciml.integrations.torch_sim needs torch-sim: {EXTRA}") from err

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (the calculator's names) or the torch dtype itself."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype in _DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}")


class MatSciMLModel(FromTrainedTask, ModelInterface):
    """torch-sim model for an S2EF :class:`~matsciml.tasks.AtomisticTask` that predicts forces.

    Args:
        task: the trained task (:func:`~matsciml.integrations.calculators.load_task`,
            :meth:`from_checkpoint`, :meth:`from_package`); moved to ``device`` and ``dtype`` in place.
        device: where to run it (CPU or a GPU); torch-sim puts its states there.
        dtype: ``"float32"`` (as trained) or ``"float64"`` (weights cast up), or the torch dtype.
            States of another dtype are cast to it.
        max_neighbors: neighbour cap of the radius graph, as for the calculator: ``"trained"``
            (default) as recorded in the task, ``None`` every neighbour within the cutoff (a smooth
            surface, for MD that must conserve energy), or an integer.
        min_distance: refuse states with two atoms closer than this, in Å (``0``: no check).

    ``compute_forces`` is always on; ``compute_stress`` is on for tasks trained with
    ``regress_stress`` (torch-sim's cell optimisers and NPT need it). Systems holding elements the
    task never saw in training are refused with a :class:`~matsciml.data.errors.DataError` naming
    the system's index in the state and the elements.

    The radius graphs are built on the CPU with vesin, one system after another, from the
    positions of every step (the state's positions are copied to the host once per call); the
    model's forward pass and the autograd forces and stress run once for the whole batch on ``device``.
    """

    def __init__(
        self,
        task: AtomisticTask,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_neighbors: MaxNeighbors = TRAINED,
        min_distance: float = DEFAULT_MIN_DISTANCE,
    ):
        super().__init__()
        if not getattr(task, "regress_forces", False):
            raise ValueError(
                f"{type(task).__name__} does not predict forces; torch-sim relaxes and integrates with forces, "
                "so it needs an S2EF task trained with regress_forces=True"
            )
        self._device = torch.device(device)
        self._dtype = as_dtype(dtype)
        self._compute_forces = True
        self._compute_stress = bool(getattr(task, "regress_stress", False))
        self.task = task.to(device=self._device, dtype=self._dtype).eval()
        self.graph = inference_graph(task, max_neighbors)  # warns here, once, if the graph is capped
        self.min_distance = check_min_distance_setting(min_distance)
        self.species = trained_species(task)

    def forward(self, state: ts.SimState | dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Energies, forces and (for stress-trained tasks) stress of every system in ``state``.

        Args:
            state: a ``torch_sim.SimState`` (or a dict of its fields) with any number of systems.
            **kwargs: ignored (torch-sim passes none today).

        Returns:
            ``energy`` in eV, ``forces`` in eV/Å and ``stress`` in eV/Å^3, detached, in the model's
            dtype on its device; stress rows of systems without a periodic cell are NaN.

        Shapes:
            energy: ``(n_systems,)``; forces: ``(n_atoms, 3)``; stress: ``(n_systems, 3, 3)``.
        """
        if isinstance(state, dict):
            state = ts.SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        out = self.task(self.batch(state))  # forces and stress need autograd: no torch.no_grad here
        results = {"energy": out["energy"].detach(), "forces": out["forces"].detach()}
        if self._compute_stress:
            stress = out.get("stress")
            if stress is None:  # no system has a cell (pbc=False): stress is undefined for all
                stress = torch.full((state.n_systems, 3, 3), float("nan"), dtype=self._dtype, device=self._device)
            results["stress"] = stress.detach()
        for name in ("energy", "forces"):
            if not bool(torch.isfinite(results[name]).all()):
                raise FloatingPointError(f"the model returned non-finite {name} for the state")
        return results

    def batch(self, state: ts.SimState):
        """The task's batch for ``state``: one :func:`batch_from_atoms` over all its systems."""
        structures = self.structures(state)
        for index, atoms in enumerate(structures):
            check_species(self.species, atoms, f"<SimState system {index}>")
        return batch_from_atoms(structures, dtype=self._dtype, min_distance=self.min_distance, **self.graph).to(
            self._device
        )

    @staticmethod
    def structures(state: ts.SimState) -> list[Atoms]:
        """The systems of ``state`` as bare ``Atoms`` (geometry only; on the host, float64).

        torch-sim 0.3 stores one ``pbc`` flag for all systems and directions, and the cell with
        lattice vectors as columns; ``Atoms`` take them as rows.
        """
        counts = torch.bincount(state.system_idx, minlength=state.n_systems).tolist()
        positions = state.positions.detach().to("cpu", torch.float64).numpy()
        cells = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()
        numbers = state.atomic_numbers.detach().cpu().numpy()
        # a tensor pbc, (3,) or per system (n_systems, 3), for torch-sim versions that store one
        pbc = state.pbc.detach().cpu().numpy() if isinstance(state.pbc, torch.Tensor) else bool(state.pbc)
        structures, start = [], 0
        for system, count in enumerate(counts):
            end = start + count
            system_pbc = pbc[system] if getattr(pbc, "ndim", 0) == 2 else pbc
            structures.append(
                Atoms(numbers=numbers[start:end], positions=positions[start:end], cell=cells[system], pbc=system_pbc)
            )
            start = end
        return structures
