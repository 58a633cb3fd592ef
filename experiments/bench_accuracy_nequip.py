"""nequip 0.19.1's side of experiments/bench_accuracy.py: its training config, and its predictions.

Two halves, for two environments:

* :func:`nequip_config` (imported by the benchmark in the main environment; standard library only)
  builds the Hydra config of ``nequip-train`` for the small model of shared/REFERENCE.md section 6;
* run as a script with the nequip environment's Python, it loads a run's best checkpoint through
  nequip's ASE calculator and writes energies and forces of every frame of an extxyz file, with the
  model's parameter count and the optimiser steps of the run's last checkpoint::

      .venv-nequip/bin/python experiments/bench_accuracy_nequip.py RUN_DIR test.xyz predictions.npz

The benchmark computes the errors from those predictions itself, the same way as for our models.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

#: The metric nequip logs for the first validation set's force MAE (eV/Å).
FORCE_MAE = "val0_epoch/forces_mae"
CHECKPOINTS = "checkpoints"


def nequip_config(
    files: dict[str, str],
    type_names: list[str],
    run_dir: str,
    max_time: str,
    cutoff: float,
    per_type_scales: bool,
    seed: int = 0,
) -> dict[str, Any]:
    """``nequip-train``'s config: NequIPGNNModel (3 layers, l_max 1, parity, 32 features), EMA, MSE, plateau.

    Args:
        files: extxyz file per split (``train``, ``val``, ``test``), absolute paths.
        type_names: chemical symbols of every element in the splits (the model's atom types).
        run_dir: absolute folder for the CSV log and the checkpoints.
        max_time: Lightning's wall-clock limit of training, ``"DD:HH:MM:SS"``.
        cutoff: r_max in Å.
        per_type_scales: per-type force RMS as energy scales (nequip's recommendation); ``False``
            (an element of the val/test splits is absent from training: nequip's RMS for it is NaN,
            checked): the global one.
        seed: data and model seed.
    """
    species_map = {name: name for name in type_names}
    loader = {"_target_": "torch.utils.data.DataLoader", "batch_size": 5}
    metrics = {
        "_target_": "nequip.train.EnergyForceMetrics",
        "coeffs": {"per_atom_energy_mae": 1.0, "forces_mae": 1.0},
    }
    stats = "${training_data_stats:%s}"
    return {
        "run": ["train", "test"],
        "data": {
            "_target_": "nequip.data.datamodule.ASEDataModule",
            "seed": seed,
            "train_file_path": files["train"],
            "val_file_path": files["val"],
            "test_file_path": files["test"],
            "transforms": [
                {
                    "_target_": "nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper",
                    "model_type_names": type_names,
                    "chemical_species_to_atom_type_map": species_map,
                },
                {"_target_": "nequip.data.transforms.NeighborListTransform", "r_max": cutoff},
            ],
            "train_dataloader": {**loader, "shuffle": True},
            "val_dataloader": loader,
            "test_dataloader": loader,
            "stats_manager": {"_target_": "nequip.data.CommonDataStatisticsManager", "type_names": type_names},
        },
        "trainer": {
            "_target_": "lightning.Trainer",
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": -1,
            "max_time": max_time,
            "check_val_every_n_epoch": 1,
            "log_every_n_steps": 5,
            "enable_progress_bar": False,
            "logger": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": run_dir, "name": "csv"},
            "callbacks": [
                {
                    "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "dirpath": f"{run_dir}/{CHECKPOINTS}",
                    "filename": "best",
                    "monitor": FORCE_MAE,
                    "mode": "min",
                    "save_last": True,
                }
            ],
        },
        "training_module": {
            "_target_": "nequip.train.EMALightningModule",
            "ema_decay": 0.999,
            "loss": {
                "_target_": "nequip.train.EnergyForceLoss",
                "per_atom_energy": True,
                "coeffs": {"total_energy": 1.0, "forces": 1.0},
            },
            "val_metrics": metrics,
            "test_metrics": metrics,
            "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01},
            "lr_scheduler": {
                "scheduler": {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "factor": 0.6, "patience": 5},
                "monitor": FORCE_MAE,
                "interval": "epoch",
                "frequency": 1,
            },
            "model": {
                "_target_": "nequip.model.NequIPGNNModel",
                "seed": seed,
                "model_dtype": "float32",
                "type_names": type_names,
                "r_max": cutoff,
                "num_layers": 3,
                "l_max": 1,
                "parity": True,
                "num_features": 32,
                "radial_mlp_depth": 2,
                "radial_mlp_width": 64,
                "num_bessels": 8,
                "polynomial_cutoff_p": 6,
                "avg_num_neighbors": stats % "num_neighbors_mean",
                "per_type_energy_shifts": stats % "per_atom_energy_mean",
                "per_type_energy_scales": stats % ("per_type_forces_rms" if per_type_scales else "forces_rms"),
            },
        },
    }


def predict(run_dir: Path, frames: Path, out: Path) -> None:
    """Energies and forces of every frame of ``frames`` by the run's best checkpoint, saved to ``out``."""
    import ase.io
    import numpy as np
    import torch
    from nequip.integrations.ase import NequIPCalculator

    torch.set_num_threads(1)
    best = run_dir / CHECKPOINTS / "best.ckpt"
    # nequip's own loader for checkpoints of its runs (what its test run and nequip-compile use)
    calc = NequIPCalculator._from_saved_model(str(best), device="cpu", chemical_species_to_atom_type_map=True)
    energies, forces = [], []
    for atoms in ase.io.iread(frames, index=":"):
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces(apply_constraint=False))  # fixed atoms too, unzeroed
    last = torch.load(run_dir / CHECKPOINTS / "last.ckpt", map_location="cpu", weights_only=False)
    np.savez(
        out,
        energy=np.asarray(energies, dtype=np.float64),
        forces=np.concatenate(forces).astype(np.float64),
        parameters=sum(p.numel() for p in calc.model.parameters()),
        steps=int(last["global_step"]),
    )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: bench_accuracy_nequip.py RUN_DIR FRAMES.xyz OUT.npz")
    predict(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
