"""A 2-process gloo fit on two weighted training and two validation datasets; driven by test_multi_dataset.py.

Usage: python multi_dataset_ddp.py OUT_DIR

Every rank writes ``OUT_DIR/rank{rank}.json``: the planned mixture indices of its training batches,
the atoms of the batches it trained on, and the validation metrics Lightning logged; rank 0 saves
``OUT_DIR/model.ckpt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package

import lightning.pytorch as pl  # noqa: E402
from helpers.training import tiny_egnn  # noqa: E402

from matsciml.data.datamodules import S2EFDataModule  # noqa: E402
from matsciml.data.devsets import devset_path  # noqa: E402
from matsciml.tasks import S2EFTask  # noqa: E402

TRAIN_BATCHES, BATCH_SIZE = 3, 4


def datamodule() -> S2EFDataModule:
    return S2EFDataModule(
        train_path=[str(devset_path("s2ef")), str(devset_path("md"))],
        weights=[0.8, 0.2],
        val_path=[str(devset_path("s2ef", "val")), str(devset_path("md", "val"))],
        batch_size=BATCH_SIZE,
        seed=5,
    )


class AtomCounting(S2EFTask):
    def training_step(self, batch, batch_idx):
        self.__dict__.setdefault("train_atoms", []).append(int(batch.natoms.sum()))
        return super().training_step(batch, batch_idx)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = datamodule()
    task = AtomCounting(tiny_egnn(), statistics=data.target_statistics)
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=1,
        limit_train_batches=TRAIN_BATCHES,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    trainer.save_checkpoint(out / "model.ckpt")  # collective; rank 0 writes
    sampler = trainer.train_dataloader.batch_sampler
    sampler.set_epoch(0)
    result = {
        "rank": trainer.global_rank,
        "planned": sampler.epoch_batches()[:TRAIN_BATCHES],
        "train_atoms": task.__dict__.get("train_atoms", []),
        "val_batches": len(trainer.val_dataloaders),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
