"""EpochTimer: one positive time per epoch, in memory and in the CSV logger's metrics.csv."""

import csv

import pytest
from helpers.training import quiet_trainer, tiny_egnn
from lightning.pytorch.loggers import CSVLogger

from matsciml.data.datamodules import IS2REDataModule
from matsciml.tasks import IS2RETask
from matsciml.tasks.timing import EpochTimer


def test_epoch_times_are_kept_and_logged_once_per_epoch(tmp_path):
    datamodule = IS2REDataModule.from_devset(batch_size=8, shuffle=False)
    datamodule.setup("fit")
    task = IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics)
    timer = EpochTimer()
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=2, logger=logger, callbacks=[timer], log_every_n_steps=1
    )
    trainer.fit(task, datamodule=datamodule)

    assert len(timer.epoch_times) == 2 and all(t > 0 for t in timer.epoch_times)
    assert len(timer.val_times) == 2 and all(t > 0 for t in timer.val_times)  # sanity check not timed
    with open(f"{logger.log_dir}/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = [float(row["time/train_epoch_s"]) for row in rows if row["time/train_epoch_s"]]
    assert logged == pytest.approx(timer.epoch_times, rel=1e-6)  # logged as float32 tensors
    assert len([row for row in rows if row["time/val_epoch_s"]]) == 2
