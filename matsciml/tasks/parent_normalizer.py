"""A fine-tune's energy normaliser: the parent's scale, references refit on the new data, a consistent shift.

After :mod:`matsciml.tasks.init_from` has loaded the parent's buffers, the normaliser is the parent's.
What the network learned is in units of the parent's ``scale`` (its raw output times the scale is
the energy beyond the baseline), so the scale is kept. A different DFT setup (or code) shifts the
energy of every element, so per-element references are refit on the new training data by default:

* refit (the default, when the parent has references or ``element_references: fit``): the
  least-squares fit of the new data (:func:`~matsciml.data.composition.fit_references`) for the
  elements in it, the parent's values for the others. The fit leaves a common offset of the
  references and the per-atom shift free; it is put into the references, so the shift stays the
  parent's and an element absent from the new data keeps exactly the baseline it had.
* ``keep_parent_references=True``: the parent's references stay and only elements the parent
  lacks are fitted (with the parent's held fixed); the shift becomes the mean per-atom residual of
  the new energies under these references.
* ``element_references`` given as a dict: those, and the shift re-derived as above.

The mean-energy baseline metric takes the new data's mean. Without statistics of the new data the
parent's normaliser stays as it is. A parent trained on the other task (S2EF total energies for an
IS2RE adsorption-energy fine-tune, or the reverse) passes on only its scale: its shift is per atom or
per structure and its references are for total energies, so both start again from the new data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from matsciml.data.composition import fit_references
from matsciml.tasks.options import composition_sums

if TYPE_CHECKING:
    from matsciml.tasks.base import AtomisticTask


def fit_references_with(sums: Mapping[str, Any], fixed: Mapping[int, float]) -> dict[int, float]:
    """References of the elements not in ``fixed``, fitted with the ``fixed`` ones held at their values.

    The fixed elements' part ``x . ref`` is moved into the targets and their rows and columns removed
    from the normal equations; what is left is the same least-squares fit over the free elements
    (with the free per-atom shift), so :func:`fit_references` solves it.

    Args:
        sums: a card's composition sums (``{"per_atom": ..., "total": ...}``).
        fixed: eV per atomic number that stay.
    """
    rows, total = sums["per_atom"], sums["total"]
    elements = [int(z) for z in rows["elements"]]
    free = [i for i, z in enumerate(elements) if z not in fixed]
    if not free:
        return {}
    held = [i for i, z in enumerate(elements) if z in fixed]
    ref = np.asarray([float(fixed[elements[i]]) for i in held])
    xx, xt, x = np.asarray(rows["xx"]), np.asarray(rows["xt"]), np.asarray(rows["x"])
    reduced = {
        "count": rows["count"],
        "elements": [elements[i] for i in free],
        "xx": xx[np.ix_(free, free)].tolist(),
        "xt": (xt[free] - xx[np.ix_(free, held)] @ ref).tolist(),
        "x": x[free].tolist(),
        "t": float(rows["t"] - x[held] @ ref),
        "tt": float(rows["tt"] - 2 * ref @ xt[held] + ref @ xx[np.ix_(held, held)] @ ref),
    }
    atoms = dict(zip(total["elements"], total["x"], strict=True))
    kept_total = {"elements": reduced["elements"], "x": [atoms[z] for z in reduced["elements"]]}
    return fit_references({"per_atom": reduced, "total": kept_total})


def refit_normalizer(
    task: AtomisticTask, parent_species: list[int] | None, statistics: Mapping[str, Any] | None
) -> str:
    """Refit ``task.normalizer`` (holding the parent's buffers) on the new data; returns what it did."""
    normalizer = task.normalizer
    if bool(normalizer.per_atom) != task.extensive:  # the parent trained the other task (IS2RE <-> S2EF):
        # its shift is per atom or per structure, its references were for total energies; neither carries over
        normalizer.per_atom.fill_(task.extensive)
        normalizer.shift.zero_()
        normalizer.set_references({})
    if not statistics:
        rank_zero_warn("matsciml: init_from without statistics of the new training data: the parent's normaliser stays")
        return f"the parent's ({normalizer.extra_repr()})"
    parent_references = normalizer.reference_energies()
    task.mean_energy.fill_(float(statistics[task.energy_key]["mean"]))
    setting, mode = task.element_references, "no element references"
    if isinstance(setting, Mapping):
        normalizer.set_references({int(z): float(e) for z, e in setting.items()})
        mode = "the given references"
    elif task.keep_parent_references:
        known = {*parent_references, *(parent_species or ())}
        fixed = {z: parent_references.get(z, 0.0) for z in known}
        added = fit_references_with(composition_sums(statistics), fixed) if setting or parent_references else {}
        normalizer.set_references({**parent_references, **added})
        mode = f"the parent's references, {len(added)} new elements fitted"
    elif setting == "fit" or parent_references:
        fitted = fit_references(composition_sums(statistics))
        normalizer.set_references({**parent_references, **fitted})
        # the fit's free offset goes into the fitted references: the parent's shift stays
        offset = task.normalizer_settings(statistics)[0] - float(normalizer.shift)
        normalizer.set_references({**parent_references, **{z: r + offset for z, r in fitted.items()}})
        task.fitted.fill_(True)
        return f"references refit for {len(fitted)} elements, the parent's shift and scale: {normalizer.extra_repr()}"
    if task.normalize:
        normalizer.shift.fill_(task.normalizer_settings(statistics)[0])
    task.fitted.fill_(True)
    return f"{mode}, the shift re-derived, the parent's scale: {normalizer.extra_repr()}"
