"""A task's settings, checked and put in the form the task keeps (one place for their errors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matsciml.data.formats.card import COMPOSITION


def compile_options(compile: bool | Mapping[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for the task's ``compile`` setting (``None``: eager).

    The ``forces`` entry of a dict is the task's own (see :func:`compile_forces`), not passed on.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        return {"dynamic": True}
    if isinstance(compile, Mapping):
        return {"dynamic": True, **{k: v for k, v in compile.items() if k != "forces"}}
    raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")


def compile_forces(compile: bool | Mapping[str, Any]) -> bool:
    """Whether force training compiles (``compile: {forces: true}``), checked."""
    forces = compile.get("forces", False) if isinstance(compile, Mapping) else False
    if not isinstance(forces, bool):
        raise TypeError(f"compile.forces must be true or false, got {forces!r}")
    return forces


def graph_record(graph: Mapping[str, Any]) -> dict[str, Any]:
    """``{"cutoff": float, "max_neighbors": int | None}``, checked."""
    if not isinstance(graph, Mapping) or set(graph) != {"cutoff", "max_neighbors"}:
        raise ValueError(f"graph must be a dict with keys 'cutoff' and 'max_neighbors', got {graph!r}")
    cutoff, cap = graph["cutoff"], graph["max_neighbors"]
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or cutoff <= 0:
        raise ValueError(f"graph.cutoff must be a positive number of Å, got {cutoff!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"graph.max_neighbors must be a positive integer or None, got {cap!r}")
    return {"cutoff": float(cutoff), "max_neighbors": cap}


def check_references(references: Any, extensive: bool, energy_key: str) -> Mapping[int, float] | str | None:
    """The ``element_references`` setting, checked: ``None``, a dict of eV per atomic number, or ``"fit"``."""
    if references is None or (isinstance(references, Mapping) and not references):
        return None
    if not extensive:
        # adsorption energies are already differences against the clean slab and gas-phase
        # references; a composition term would make them grow with the slab's size
        raise ValueError(
            f"element_references apply to total energies (S2EF); {energy_key!r} is an adsorption "
            "energy, already referenced to the slab and gas phase: leave element_references unset"
        )
    if references == "fit" or isinstance(references, Mapping):
        return references
    raise TypeError(f"element_references must be a dict atomic number -> eV or 'fit', got {references!r}")


def composition_sums(statistics: Mapping[str, Any]) -> Mapping[str, Any]:
    """The card's composition sums that element references are fitted from (a clear error if absent)."""
    if COMPOSITION not in statistics:
        raise ValueError(
            f"element references need the training statistics' {COMPOSITION!r} sums, which these "
            "statistics lack; pass datamodule.target_statistics of a matsciml data module "
            "(it recomputes old cards)"
        )
    return statistics[COMPOSITION]


def check_optimisation(
    lr: float,
    gamma: float,
    loss: str,
    losses: list[str],
    huber_delta: float,
    scheduler: str,
    plateau_factor: float,
    plateau_patience: int,
) -> None:
    """Refuse optimiser, loss and scheduler settings no run could use."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if loss not in losses:
        raise ValueError(f"loss must be one of {losses}, got {loss!r}")
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be positive (normalised units), got {huber_delta!r}")
    if scheduler not in ("exponential", "plateau"):
        raise ValueError(f"scheduler must be 'exponential' or 'plateau', got {scheduler!r}")
    if not 0 < plateau_factor < 1 or plateau_patience < 0:
        raise ValueError(
            f"plateau_factor must be in (0, 1) and plateau_patience >= 0, got {plateau_factor}, {plateau_patience}"
        )


def check_datamodule(model: Any, datamodule: Any) -> str | None:
    """The data module's representation, after checking that ``model`` can read what it builds."""
    representation = getattr(datamodule, "representation", None)
    if representation is not None and representation != model.representation:
        raise ValueError(
            f"{type(model).__name__} needs representation={model.representation!r} "
            f"but the data module builds {representation!r}; set data.representation"
        )
    data_cutoff, model_cutoff = getattr(datamodule, "cutoff", None), getattr(model, "cutoff", None)
    if (
        representation == "graph"
        and data_cutoff is not None
        and model_cutoff is not None
        and data_cutoff < model_cutoff
    ):
        raise ValueError(
            f"the data's radius graph (cutoff {data_cutoff} Å) is shorter than the model's "
            f"cutoff {model_cutoff} Å; neighbours in between would be missing"
        )
    return representation
