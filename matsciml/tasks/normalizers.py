"""Target normalisation: models learn in normalised units, tasks report eV.

A model's raw output ``y`` becomes an energy in eV as

    E = scale * y + shift * (natoms if per_atom else 1) + sum_i reference[Z_i]

so a freshly initialised model (raw output near zero: the models start their last layer
small) predicts ``shift * natoms + sum ref[Z]`` - the training mean, or with references the
least-squares composition fit - and forces come out scaled by ``scale`` (``F = -scale * dy/dx``).
``shift`` and ``scale`` are statistics of the reference-subtracted energies, so references
are never counted twice. Every quantity is a buffer: it is saved in
the checkpoint and moves with the module between devices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from matsciml.data.batch import Batch

#: Largest atomic number with a reference-energy slot.
MAX_ATOMIC_NUMBER = 118


class EnergyNormalizer(nn.Module):
    """Affine map between a model's raw output and an energy in eV.

    Args:
        shift: added per atom (``per_atom=True``) or per structure, in eV.
        scale: multiplies the raw output, in eV (for S2EF, the force-component std in eV/Å
            makes forces unit-variance; for IS2RE, the target std).
        per_atom: whether ``shift`` is an energy per atom (extensive targets) or per structure.
        element_references: optional reference energy in eV per atomic number, summed over
            the atoms of each structure (e.g. isolated-atom or fitted composition energies).
    """

    def __init__(
        self,
        shift: float = 0.0,
        scale: float = 1.0,
        per_atom: bool = False,
        element_references: Mapping[int, float] | None = None,
    ):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"normaliser scale must be positive, got {scale}")
        self.register_buffer("shift", torch.tensor(float(shift), dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float64))
        self.register_buffer("per_atom", torch.tensor(bool(per_atom)))
        self.register_buffer("references", torch.zeros(MAX_ATOMIC_NUMBER + 1, dtype=torch.float64))
        self.set_references(element_references or {})

    def set_references(self, element_references: Mapping[int, float]) -> None:
        """Replace the reference energies (eV per atomic number; others become zero)."""
        self.references.zero_()
        for number, energy in element_references.items():
            if not 1 <= int(number) <= MAX_ATOMIC_NUMBER:
                raise ValueError(f"element reference for atomic number {number} is out of range")
            self.references[int(number)] = float(energy)

    def reference_energies(self) -> dict[int, float]:
        """The non-zero reference energies, eV per atomic number."""
        return {int(z): float(self.references[z]) for z in torch.nonzero(self.references).flatten().tolist()}

    def baseline(self, batch: Batch, dtype: torch.dtype) -> torch.Tensor:
        """The energy each structure gets from a zero raw output, ``(num_structures,)``."""
        counts = batch.natoms.to(dtype) if bool(self.per_atom) else torch.ones_like(batch.natoms, dtype=dtype)
        energy = self.shift.to(dtype) * counts
        if bool(self.references.any()):
            per_atom = self.references.to(dtype)[batch.atomic_numbers]
            energy = energy.index_add(0, batch.structure_index, per_atom)
        return energy

    def denormalize(self, raw: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Raw model output ``(num_structures,)`` to energies in eV."""
        dtype = batch.positions.dtype
        return raw.to(dtype) * self.scale.to(dtype) + self.baseline(batch, dtype)

    def extra_repr(self) -> str:
        kind = "per atom" if bool(self.per_atom) else "per structure"
        references = self.reference_energies()
        text = f"shift={float(self.shift):.4g} eV {kind}, scale={float(self.scale):.4g}"
        return text + (f", references for {len(references)} elements" if references else "")
