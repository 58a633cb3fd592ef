"""S2EF: structure to energy and forces (and optionally stress).

Forces are ``-dE/dpositions`` from one ``torch.autograd.grad`` call on the predicted
energy; in training the graph is kept (``create_graph=True``) so the force loss reaches
the weights through a single ``backward`` that Lightning makes. Validation, test and
predict run under Lightning's ``inference_mode``, where autograd is off and batch tensors
are inference tensors; :func:`autograd_batch` re-enables it locally on fresh copies. Under
mixed precision the energy-and-force pass runs with autocast off, in float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from matsciml.data import keys as K
from matsciml.data.backends import as_batch
from matsciml.data.batch import Batch
from matsciml.models.base import AbstractEnergyModel
from matsciml.tasks.base import AtomisticTask, LossName, SchedulerName


@contextmanager
def autograd_enabled() -> Iterator[None]:
    """Autograd on, even inside ``torch.inference_mode`` or ``torch.no_grad``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


#: Cells of smaller volume (Å^3) count as none: a molecule's zero cell has no stress.
MIN_CELL_VOLUME = 1e-3


def cell_volumes(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Volume ``(B,)`` in Å^3 and whether each structure has a cell: periodic along all three
    lattice vectors with a non-zero volume. Stress ``(1/V) dE/dstrain`` exists only there."""
    volume = torch.linalg.det(batch.cell).abs()
    has_cell = volume > MIN_CELL_VOLUME
    if batch.pbc is not None:
        has_cell = has_cell & batch.pbc.all(dim=1)
    return volume, has_cell


def autograd_batch(batch: Batch) -> Batch:
    """A copy of ``batch`` whose tensors may enter autograd (inference tensors cannot)."""
    if not any(t.is_inference() for _, t in batch.items()):
        return batch
    return Batch(**{name: tensor.clone() for name, tensor in batch.items()})


class S2EFTask(AtomisticTask):
    """Train a model on energies and forces (OC20 S2EF); alias ``S2EFLitModule``.

    Args:
        model: the energy model.
        regress_forces: predict forces as ``-dE/dx`` and train on them.
        regress_stress: predict stress ``(1/V) dE/dstrain`` and train on it where records carry
            ``stress`` and a cell; structures without a cell (molecules) still get energy and forces.
        lr, gamma: Adam learning rate and ExponentialLR decay per epoch.
        energy_coefficient, force_coefficient, stress_coefficient: loss weights.
        energy_loss: ``"per_atom"`` (default): the energy loss compares energies per atom, so large
            cells do not dominate; ``"total"``: total energies (both over the energy scale).
        statistics, species, element_references, normalize, loss, compile, graph, huber_delta, scheduler,
            monitor, plateau_factor, plateau_patience, ema_decay, freeze, unfreeze_after_epochs, init_from,
            keep_parent_references, pretrained_lr: see :class:`AtomisticTask`.

    The energy normaliser shifts by the mean energy per atom (less the element references, if
    any) and scales by the std of the free atoms' force components (so normalised forces have
    unit variance), or by the energy std when forces are not regressed. Losses are in these
    normalised units; metrics are in eV, eV/Å, eV/Å^3. Atoms marked ``fixed`` are left out of
    force losses, metrics and statistics. The stress loss compares virials per atom,
    ``stress * V / natoms``, in units of the energy scale: the stress scale of a structure is
    ``scale / (V / natoms)`` in eV/Å^3, the same normalisation as the per-atom energy loss.
    """

    task = "s2ef"
    energy_key = K.ENERGY
    extensive = True

    def __init__(
        self,
        model: AbstractEnergyModel,
        regress_forces: bool = True,
        regress_stress: bool = False,
        lr: float = 1e-3,
        gamma: float = 0.9,
        energy_coefficient: float = 1.0,
        force_coefficient: float = 10.0,
        stress_coefficient: float = 1.0,
        energy_loss: Literal["per_atom", "total"] = "per_atom",
        statistics: dict | None = None,
        species: list[int] | None = None,
        element_references: dict[int, float] | Literal["fit"] | None = None,
        normalize: bool = True,
        loss: LossName = "l1",
        compile: bool | dict[str, Any] = False,
        graph: dict[str, Any] | None = None,
        huber_delta: float = 1.0,
        scheduler: SchedulerName = "exponential",
        monitor: str | None = None,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        ema_decay: float | None = None,
        freeze: list[str] | None = None,
        unfreeze_after_epochs: int | None = None,
        init_from: str | None = None,
        keep_parent_references: bool = False,
        pretrained_lr: float | None = None,
    ):
        if min(energy_coefficient, force_coefficient, stress_coefficient) < 0:
            raise ValueError("loss coefficients must be >= 0")
        if energy_loss not in ("per_atom", "total"):
            raise ValueError(f"energy_loss must be 'per_atom' or 'total', got {energy_loss!r}")
        self.energy_loss = energy_loss
        self.regress_forces = regress_forces
        self.regress_stress = regress_stress
        super().__init__(
            model,
            lr=lr,
            gamma=gamma,
            statistics=statistics,
            species=species,
            element_references=element_references,
            normalize=normalize,
            loss=loss,
            compile=compile,
            graph=graph,
            huber_delta=huber_delta,
            scheduler=scheduler,
            monitor=monitor,
            plateau_factor=plateau_factor,
            plateau_patience=plateau_patience,
            ema_decay=ema_decay,
            freeze=freeze,
            unfreeze_after_epochs=unfreeze_after_epochs,
            init_from=init_from,
            keep_parent_references=keep_parent_references,
            pretrained_lr=pretrained_lr,
        )
        self.energy_coefficient = energy_coefficient
        self.force_coefficient = force_coefficient
        self.stress_coefficient = stress_coefficient

    def normalizer_settings(self, statistics: Mapping[str, Any]) -> tuple[float, float]:
        shift = float(self.energy_statistics(statistics, per_atom=True)["mean"])
        if self.regress_forces and K.FORCES in statistics:
            scale = float(statistics[K.FORCES]["components"]["std"])  # free atoms only (see the card)
        else:
            scale = float(self.energy_statistics(statistics, per_atom=False)["std"])
        return shift, scale if scale > 0 else 1.0

    def validation_metrics(self) -> list[str]:
        names = super().validation_metrics()
        if self.regress_forces:
            names += ["val/force_mae", "val/force_cosine", "val/force_mae_baseline"]
        if self.regress_stress:
            names.append("val/stress_mae")
        return names

    @property
    def trains_forces(self) -> bool:
        return self.regress_forces or self.regress_stress

    def compiled_forces(self):
        # the traced graph differentiates by positions only; stress (a strain derivative) stays eager
        return None if self.regress_stress else super().compiled_forces()

    # -- prediction --------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Energies ``(B,)`` in eV, and forces ``(N, 3)`` in eV/Å / stress ``(B, 3, 3)`` in eV/Å^3.

        Stress is returned when at least one structure has a cell (:func:`cell_volumes`); the
        rows of structures without one (molecules) are NaN, as their stress is undefined.
        """
        batch = as_batch(batch)
        if not (self.regress_forces or self.regress_stress):
            return {"energy": self.energy(batch)}
        keep_graph = self.training and torch.is_grad_enabled()
        # Forces are derivatives of the energy: under mixed precision (bf16-mixed, 16-mixed) the
        # energy-and-force pass still runs in float32, or forces would carry bf16's 3 digits.
        full_precision = torch.autocast(device_type=batch.positions.device.type, enabled=False)
        compiled = self.compiled_forces() if keep_graph else None
        if compiled is not None:
            with full_precision:
                raw, gradient = compiled(self.model, batch)
                # the normaliser is affine in the raw output: F = -scale * d(raw)/dx
                forces = -gradient * self.energy_scale.to(gradient.dtype)
                return {"energy": self.normalizer.denormalize(raw, batch), "forces": forces}
        with autograd_enabled(), full_precision:
            batch = autograd_batch(batch)
            positions = batch.positions.detach().requires_grad_(True)
            inputs, cell = [positions], batch.cell
            if self.regress_stress:
                # E(positions (1 + eps), cell (1 + eps)); stress = dE/deps / volume at eps = 0
                strain = torch.zeros_like(cell, requires_grad=True)
                symmetric = 0.5 * (strain + strain.transpose(1, 2))
                positions_in = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch.structure_index])
                cell = cell + torch.bmm(cell, symmetric)
                inputs.append(strain)
            else:
                positions_in = positions
            energy = self.energy(batch.replace(positions=positions_in, cell=cell), create_graph=keep_graph)
            gradients = torch.autograd.grad(energy.sum(), inputs, create_graph=keep_graph)
        out = {"energy": energy if keep_graph else energy.detach()}
        if self.regress_forces:
            out["forces"] = -gradients[0]
        if self.regress_stress:
            volume, has_cell = cell_volumes(batch)
            if bool(has_cell.any()):
                volume = torch.where(has_cell, volume, torch.ones_like(volume)).to(energy.dtype)
                stress = gradients[-1] / volume[:, None, None]
                out["stress"] = stress.masked_fill(~has_cell[:, None, None], float("nan"))
        return out

    # -- steps -------------------------------------------------------------------------
    def step(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        batch = as_batch(batch)
        out = self.forward(batch)
        dtype = out["energy"].dtype
        scale = self.energy_scale.to(dtype)
        target_energy = batch.energy.to(dtype)
        natoms = batch.natoms.to(dtype)
        # per atom by default, so large cells do not dominate
        per = natoms if self.energy_loss == "per_atom" else torch.ones_like(natoms)
        loss = self.energy_coefficient * self.loss_fn(out["energy"] / per / scale, target_energy / per / scale)
        metrics = self.energy_metrics(out["energy"], target_energy, batch)
        if self.regress_forces:
            free = ~batch.fixed if batch.fixed is not None else torch.ones_like(batch.atomic_numbers, dtype=torch.bool)
            forces, target_forces = out["forces"][free], batch.forces.to(dtype)[free]
            if forces.numel():
                loss = loss + self.force_coefficient * self.loss_fn(forces / scale, target_forces / scale)
                metrics.update(self.force_metrics(forces.detach(), target_forces))
        if self.regress_stress and batch.stress is None and self.training and not self.__dict__.get("_said_no_stress"):
            self.__dict__["_said_no_stress"] = True  # once: a dataset without stress labels says so every batch
            rank_zero_warn(
                "matsciml: regress_stress=True but the training batches carry no 'stress' labels; the "
                "stress loss is skipped for them (structures with labels and a cell still train on it)"
            )
        if self.regress_stress and "stress" in out and batch.stress is not None:
            volume, has_cell = cell_volumes(batch)
            labelled = has_cell & torch.isfinite(batch.stress).all(dim=2).all(dim=1)
            if bool(labelled.any()):
                # eV/Å^3 per structure: stress * (V / natoms) / scale is a virial per atom in energy units
                stress_scale = (scale / (volume.to(dtype) / natoms))[labelled][:, None, None]
                stress, target_stress = out["stress"][labelled], batch.stress.to(dtype)[labelled]
                loss = loss + self.stress_coefficient * self.loss_fn(
                    stress / stress_scale, target_stress / stress_scale
                )
                metrics["stress_mae"] = ((stress.detach() - target_stress).abs().mean(), int(labelled.sum()))
        return loss, metrics

    @staticmethod
    def force_metrics(forces: torch.Tensor, target: torch.Tensor) -> dict:
        components = forces.numel()
        cosine = torch.nn.functional.cosine_similarity(forces, target, dim=-1, eps=1e-12)
        return {
            "force_mae": ((forces - target).abs().mean(), components),
            "force_cosine": (cosine.mean(), forces.shape[0]),
            "force_mae_baseline": (target.abs().mean(), components),
        }


#: The name used in the Open MatSci ML Toolkit paper.
S2EFLitModule = S2EFTask
