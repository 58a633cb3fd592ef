"""Write what ``predict`` returns to one ``.npz`` file per process, atomically (:func:`matsciml.atomic.write_file`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from matsciml.atomic import write_file


def gather_predictions(batches: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate per-batch predictions: ``energy``/``sid``/``fid`` per structure, ``forces``
    per atom in structure order with ``natoms`` to split them."""
    arrays: dict[str, np.ndarray] = {}
    for key in ("sid", "fid", "energy"):
        if batches and key in batches[0]:
            arrays[key] = torch.cat([b[key].detach().cpu() for b in batches]).numpy()
    if batches and "forces" in batches[0]:
        forces = [f.detach().cpu() for b in batches for f in b["forces"]]
        arrays["natoms"] = np.array([len(f) for f in forces], dtype=np.int64)
        arrays["forces"] = torch.cat(forces).numpy()
    return arrays


class PredictionWriter(BasePredictionWriter):
    """Save ``matsciml predict`` results as ``predictions.npz`` (energies in eV, forces in eV/Å).

    Args:
        path: output file; default ``predictions.npz`` in the run's log directory. With several
            processes each writes ``<stem>.rank<r>.npz`` (the sampler splits the structures).
    """

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        self.path = path
        self.written_path: Path | None = None  # this process's file, once written (for step records)

    def _target(self, trainer: pl.Trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.log_dir or ".") / "predictions.npz"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        arrays = gather_predictions(list(batches))
        path = self._target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda handle: np.savez(handle, **arrays))  # a full disk keeps the old file
        self.written_path = path
        print(f"matsciml: wrote {len(arrays.get('energy', []))} predictions to {path}")
