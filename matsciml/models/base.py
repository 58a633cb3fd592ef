"""The research API: a model maps a batch to per-structure energies.

Subclass :class:`AbstractEnergyModel` and implement :meth:`~AbstractEnergyModel.energy`.
Everything else (forces as ``-dE/dpositions``, losses, normalisation, logging) belongs to
the tasks, so a new model stays a few dozen lines. Geometry is recomputed here, inside the
differentiable forward pass, so autograd forces see every path from positions to energy.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Literal

import torch

from matsciml.artifacts.trust import resolve_class
from matsciml.data.backends import as_batch
from matsciml.data.batch import Batch
from matsciml.models.species_axes import SpeciesAxis

Representation = Literal["graph", "point_cloud"]

#: set while matsciml traces a model into a graph itself (:mod:`matsciml.tasks.compiled_forces`)
_TRACING = False


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Mark a ``make_fx`` trace of a model: code that reads tensor values back skips it, as under compile."""
    global _TRACING
    before, _TRACING = _TRACING, True
    try:
        yield
    finally:
        _TRACING = before


def _is_compiling() -> bool:
    if _TRACING:
        return True
    compiler = getattr(torch, "compiler", None)  # torch.compiler.is_compiling: torch >= 2.3
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


class AbstractEnergyModel(torch.nn.Module, abc.ABC):
    """Base class of every energy model.

    Class attributes a subclass declares:
        representation: the batch it needs, ``"graph"`` (``edge_index``/``cell_shifts``) or
            ``"point_cloud"`` (``point_index``/``point_mask``/``point_features``).
        per_atom: whether :meth:`energy` returns per-atom energies ``(num_atoms,)``, which
            the base class sums per structure, instead of ``(num_structures,)``.
        autocast: whether :meth:`energy` may run under mixed precision (``bf16-mixed``). Models
            whose kernels mix dtypes under autocast (e3nn's tensor products) set it ``False``
            and then always run in the dtype of the positions.

    Args:
        cutoff: interaction radius in Å; the data's radius graph must use at least this.
    """

    representation: ClassVar[Representation] = "graph"
    per_atom: ClassVar[bool] = False
    autocast: ClassVar[bool] = True

    def __init__(self, cutoff: float = 6.0):
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = cutoff

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Record the arguments of the outermost __init__ so that a checkpoint can rebuild the
        # model from plain data (spec()), without pickling the module object.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))
                for name, parameter in signature.parameters.items():
                    if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(arguments.pop(name))
                object.__setattr__(self, "_init_args", _plain(arguments))
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` that rebuilds this model (the LightningCLI format)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self._init_args)}

    @staticmethod
    def from_spec(spec: dict[str, Any], trusted_modules: Iterable[str] | None = None) -> AbstractEnergyModel:
        """Build a model from :meth:`spec` output; only ``AbstractEnergyModel`` subclasses load.

        Args:
            spec: ``{"class_path", "init_args"}``, e.g. from a checkpoint.
            trusted_modules: modules besides ``matsciml`` the class may come from; any other module
                is refused before it is imported (:func:`matsciml.artifacts.trust.resolve_class`).
        """
        if not (isinstance(spec, dict) and isinstance(spec.get("init_args", {}), dict)):
            raise ValueError("a model spec must be {'class_path': str, 'init_args': dict}")
        cls = resolve_class(spec.get("class_path"), AbstractEnergyModel, trusted_modules, what="model class")
        return cls(**spec.get("init_args", {}))

    @abc.abstractmethod
    def energy(self, batch: Batch) -> torch.Tensor:
        """Energies in eV: ``(num_structures,)``, or ``(num_atoms,)`` when ``per_atom``."""

    def forward(self, batch: Batch) -> torch.Tensor:
        """Per-structure energies in eV, shape ``(num_structures,)`` (``batch``: ours, DGL or PyG)."""
        batch = as_batch(batch)
        if self.representation == "graph" and batch.edge_index is None:
            raise ValueError(f"{type(self).__name__} needs a graph batch (representation='graph' in the data)")
        if self.representation == "point_cloud" and batch.point_index is None:
            raise ValueError(f"{type(self).__name__} needs point clouds (representation='point_cloud' in the data)")
        # energies in the positions' dtype: under autocast a model may compute in bf16, but sums
        # of per-atom energies (hundreds of eV) need float32's digits
        if self.autocast:
            energy = self.energy(batch)
        else:
            with torch.autocast(batch.positions.device.type, enabled=False):
                energy = self.energy(batch)
        energy = energy.to(batch.positions.dtype)
        if self.per_atom:
            return self.sum_per_structure(energy, batch)
        if energy.shape != (batch.num_structures,):
            raise ValueError(
                f"{type(self).__name__}.energy returned shape {tuple(energy.shape)}; expected "
                f"({batch.num_structures},), one energy per structure (set per_atom=True for atoms)"
            )
        return energy

    # -- helpers for subclasses ----------------------------------------------------------
    def check_species(self, numbers: torch.Tensor) -> None:
        """Refuse atomic numbers above ``self.num_species`` (an embedding would index past its end).

        Skipped while ``torch.compile`` traces: reading the maximum back to Python would split
        the compiled graph in two.
        """
        if not _is_compiling() and int(numbers.max()) > self.num_species:
            raise ValueError(f"atomic number {int(numbers.max())} exceeds num_species={self.num_species}")

    @staticmethod
    def edge_vectors(batch: Batch) -> torch.Tensor:
        """Vectors from each centre ``i`` to its neighbour ``j``, periodic images included.

        ``positions[j] - positions[i] + cell_shifts @ cell``, computed from the batch's
        tensors so gradients reach ``positions`` (and ``cell``, for stress).

        Shapes:
            returns ``(num_edges, 3)`` in the dtype of ``positions``.
        """
        j, i = batch.edge_index
        cell = batch.cell[batch.structure_index[i]]
        offsets = torch.einsum("ek,ekl->el", batch.cell_shifts.to(cell.dtype), cell)
        return batch.positions[j] - batch.positions[i] + offsets

    @staticmethod
    def sum_per_structure(values: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Sum per-atom values ``(num_atoms, ...)`` into ``(num_structures, ...)``."""
        out = values.new_zeros((batch.num_structures, *values.shape[1:]))
        return out.index_add(0, batch.structure_index, values)

    @staticmethod
    def cosine_cutoff(distances: torch.Tensor, cutoff: float) -> torch.Tensor:
        """Smooth envelope, 1 at r = 0 and 0 with zero slope at the cutoff.

        Multiplying messages by it keeps energies and forces continuous when atoms cross
        the cutoff.
        """
        envelope = 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0)
        return envelope * (distances < cutoff).to(distances.dtype)

    def species_indexed(self) -> dict[str, SpeciesAxis]:
        """Tensors of this module indexed by atomic number, ``{state_dict name: SpeciesAxis}``.

        Override it for per-element tensors the model creates itself (e.g. a plain ``nn.Embedding``);
        layers declare their own the same way. A fine-tune with more species copies the parent's slices
        of these and initialises the rest (:mod:`matsciml.models.species_axes`); none by default.
        """
        return {}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: specs must survive YAML and ``torch.load(weights_only=True)``."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
