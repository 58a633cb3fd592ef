"""A 2-process DDP (gloo) fit with the embedding frozen; driven by tests/tasks/test_freezing.py.

Usage: python freeze_ddp_script.py OUT_DIR [--release N] [--init-from CKPT]

Two epochs of two steps with ``freeze=["model.embedding.*"]`` (``--release N``: ``unfreeze_after_epochs=N``;
``--init-from CKPT``: a fine-tune of that checkpoint, its loaded weights at ``pretrained_lr``).
Every rank writes ``OUT_DIR/rank{global_rank}.json``: whether the frozen parameters were bitwise unchanged
while frozen, whether they changed after the release, whether the other parameters trained, the structures
its batches held, and the bytes of every parameter at the end (hex), to compare the ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers.training import tiny_egnn

from matsciml.data.datamodules import S2EFDataModule
from matsciml.tasks import S2EFTask

FROZEN = "model.embedding.weight"


class Watch(pl.Callback):
    """The embedding after the DDP broadcast and at the end of each epoch; the structures of each batch."""

    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.after_epoch: list[torch.Tensor] = []
        self.batches: list[list[int]] = []

    def on_fit_start(self, trainer, pl_module):  # after DDP's broadcast from rank 0
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.sid.tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        self.after_epoch.append(dict(pl_module.named_parameters())[FROZEN].detach().clone())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--release", type=int, default=None)
    parser.add_argument("--init-from", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    datamodule = S2EFDataModule.from_devset(batch_size=4)
    tuning = {} if args.init_from is None else {"init_from": args.init_from, "pretrained_lr": 1e-3}
    task = S2EFTask(tiny_egnn(), lr=3e-3, freeze=["model.embedding.*"], unfreeze_after_epochs=args.release, **tuning)
    watch = Watch()
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=datamodule)
    frozen_epochs = 2 if args.release is None else args.release
    start = watch.start[FROZEN]
    final = dict(task.named_parameters())
    result = {
        "frozen_unchanged_while_frozen": all(torch.equal(w, start) for w in watch.after_epoch[:frozen_epochs]),
        "released_changed": not torch.equal(final[FROZEN], start),
        "others_changed": all(not torch.equal(p, watch.start[n]) for n, p in final.items() if n != FROZEN),
        "batches": watch.batches,
        "start_embedding": start.contiguous().numpy().tobytes().hex(),
        "init_report": task.init_report,
        "weights": {n: p.detach().contiguous().numpy().tobytes().hex() for n, p in final.items()},
    }
    (args.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
