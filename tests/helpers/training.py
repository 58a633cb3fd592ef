"""Small models and quiet Lightning trainers for task tests."""

from __future__ import annotations

import lightning.pytorch as pl

from matsciml.models import EGNN, MegNet


def tiny_megnet() -> MegNet:
    """A MegNet small enough for a Lightning run (or a compile) in seconds."""
    return MegNet(
        num_blocks=1,
        dense_sizes=(16, 8),
        conv_sizes=(16, 8),
        num_gaussians=8,
        set2set_layers=1,
        set2set_steps=2,
        output_sizes=(8,),
        dropout=0.0,
    )


def tiny_egnn(**kwargs) -> EGNN:
    """An EGNN small enough for a Lightning run in a second or two."""
    settings = dict(
        hidden=8,
        num_layers=1,
        edge_sizes=(8,),
        node_sizes=(8,),
        projection_hidden=16,
        output_depth=2,
        output_hidden=8,
        num_radial=4,
        cutoff=6.0,
    )
    return EGNN(**{**settings, **kwargs})


def quiet_trainer(**kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**settings, **kwargs})


#: ``matsciml fit`` arguments of a two-step S2EF devset run that validates once (run from the repository root)
QUICK_FIT = [
    "--config",
    "configs/devset/s2ef-egnn.yaml",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
