"""Runs a tiny EGNN DDP fit on the S2EF devset; driven by tests/distributed/test_ddp.py.

Usage: python ddp_script.py OUT_DIR [--devices N] [--num-nodes N] [--fail-rank R] [--compile BACKEND --energy-only]

Every rank writes ``OUT_DIR/rank{global_rank}.json`` with a hash of its final weights, the validation
metrics Lightning logged, the training metrics it logged per step (with a rank-dependent probe) and per
epoch, and the structures each of its loaders visited; rank 0 saves
``OUT_DIR/model.ckpt``, then every rank predicts its share of the predict split.
``--fail-rank R`` makes rank R raise in its second training step. ``--compile BACKEND`` runs the model
through ``torch.compile`` (``--energy-only``: no force loss, so training steps run compiled too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package

import lightning.pytorch as pl  # noqa: E402
from helpers.training import tiny_egnn  # noqa: E402

from matsciml.data.datamodules import S2EFDataModule  # noqa: E402
from matsciml.tasks import S2EFTask  # noqa: E402


class RecordingTask(S2EFTask):
    """Records the structure ids seen by each stage; optionally fails on one rank."""

    def __init__(self, *args, fail_rank: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_rank = fail_rank
        self.seen = {"train": [], "val": []}
        self.train_atoms = []
        self.train_logged = []  # per training step: {name: [value, weight]} as logged on this rank

    def training_step(self, batch, batch_idx):
        if batch_idx == 1 and self.global_rank == self.fail_rank:
            raise RuntimeError(f"deliberate failure on rank {self.global_rank}")
        self.seen["train"].append(list(zip(batch.sid.tolist(), batch.fid.tolist(), strict=True)))
        self.train_atoms.append(int(batch.natoms.sum()))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen["val"].extend(zip(batch.sid.tolist(), batch.fid.tolist(), strict=True))
        return super().validation_step(batch, batch_idx)

    def log_metrics(self, stage, metrics):
        if stage == "train":  # a probe far apart on the ranks, with rank-dependent weights
            probe = torch.tensor(100.0 * self.global_rank + len(self.train_logged))
            metrics = {**metrics, "rank_probe": (probe, self.global_rank + 1)}
            self.train_logged.append({name: [float(v), float(w)] for name, (v, w) in metrics.items() if w})
        super().log_metrics(stage, metrics)


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--train-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compile", default=None, help="torch.compile backend")
    parser.add_argument("--energy-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    datamodule = S2EFDataModule.from_devset(batch_size=args.batch_size)
    datamodule.setup("fit")
    task = RecordingTask(
        tiny_egnn(),
        statistics=datamodule.target_statistics,
        fail_rank=args.fail_rank,
        regress_forces=not args.energy_only,
        compile={"backend": args.compile} if args.compile else False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=args.devices,
        num_nodes=args.num_nodes,
        max_epochs=1,
        limit_train_batches=args.train_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=datamodule)
    train_epoch = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and k.endswith("_epoch")
    }
    trainer.save_checkpoint(args.out / "model.ckpt")  # collective; rank 0 writes
    loaders = {
        "train_sampler": type(trainer.train_dataloader.sampler).__name__,
        "val_sampler": type(trainer.val_dataloaders.sampler).__name__,
        "val_batches": len(trainer.val_dataloaders),
    }
    predictions = trainer.predict(task, datamodule=datamodule)
    predicted = [pair for p in predictions for pair in zip(p["sid"].tolist(), p["fid"].tolist(), strict=True)]
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "hash": weights_hash(task),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "seen": {**task.seen, "predict": predicted},
        "predict_size": len(datamodule.datasets["predict"]),
        "train_atoms": task.train_atoms,
        "train_logged": task.train_logged,
        "train_epoch": train_epoch,
        "compiled": "_compiled_model" in task.__dict__,
        **loaders,
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
