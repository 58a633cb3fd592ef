"""DataModules follow the Lightning contract and work from the shipped devsets."""

import lightning.pytorch as pl
import pytest
import torch
from helpers.training import quiet_trainer, tiny_egnn

from matsciml.data import IS2REDataModule, S2EFDataModule, datamodules
from matsciml.data.batch import Batch
from matsciml.tasks import IS2RETask


def test_setup_builds_only_the_splits_a_stage_needs(s2ef_path):
    dm = S2EFDataModule(train_path=s2ef_path, val_path=s2ef_path, test_path=s2ef_path, batch_size=4)
    dm.setup("test")
    assert set(dm.datasets) == {"test"}
    dm.setup("fit")
    assert set(dm.datasets) == {"test", "train", "val"}


def test_train_loader_yields_graph_batches_shuffled_by_seed(s2ef_path):
    def order(seed):
        dm = S2EFDataModule(train_path=s2ef_path, batch_size=4, seed=seed)
        dm.setup("fit")
        return [int(s) for batch in dm.train_dataloader() for s in batch.sid]

    assert order(0) == order(0) and sorted(order(0)) == list(range(12))
    assert order(0) != order(1)
    dm = S2EFDataModule(train_path=s2ef_path, batch_size=4, cutoff=5.0, max_neighbors=12)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.num_structures == 4
    assert batch.edge_index is not None and batch.forces.shape == (batch.num_atoms, 3)
    assert int(torch.bincount(batch.edge_index[1]).max()) <= 12


def test_point_cloud_representation(is2re_path):
    dm = IS2REDataModule(train_path=is2re_path, batch_size=3, representation="point_cloud", num_subsurface=2)
    batch = next(iter(dm.train_dataloader()))
    assert batch.edge_index is None and batch.point_mask.shape == (3, 7)
    assert batch.relaxed_energy.shape == (3,)


def test_missing_split_and_bad_arguments_are_clear(s2ef_path):
    dm = S2EFDataModule(train_path=s2ef_path)
    with pytest.raises(ValueError, match="has no val_path"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        S2EFDataModule(train_path=s2ef_path, batch_size=0)
    with pytest.raises(ValueError, match="representation must be"):
        S2EFDataModule(train_path=s2ef_path, representation="voxels")
    with pytest.raises(ValueError, match="give at least one of"):
        S2EFDataModule()


def test_what_the_data_knows(s2ef_path):
    dm = S2EFDataModule(train_path=s2ef_path)
    assert dm.species == [8, 29, 47, 78, 79]
    assert dm.target_statistics["energy"]["count"] == 12
    assert dm.natoms().tolist() == [13] * 12


def test_the_average_number_of_neighbours_is_that_of_the_datas_own_graph(s2ef_path, monkeypatch):
    # every record's graph, as the loaders build it (cutoff and neighbour cap included)
    for cutoff, cap in ((6.0, None), (4.0, None), (6.0, 5)):
        dm = S2EFDataModule(train_path=s2ef_path, cutoff=cutoff, max_neighbors=cap, shuffle=False, batch_size=12)
        batch = next(iter(dm.train_dataloader()))
        assert dm.avg_num_neighbors == pytest.approx(batch.num_edges / batch.num_atoms, rel=1e-12)
    assert dm.avg_num_neighbors == 5.0
    # a seeded sample of the records on large datasets
    monkeypatch.setattr(datamodules, "NEIGHBOR_SAMPLE", 3)
    sampled = S2EFDataModule(train_path=s2ef_path, seed=1).avg_num_neighbors
    assert sampled > 0 and S2EFDataModule(train_path=s2ef_path, seed=1).avg_num_neighbors == sampled
    assert S2EFDataModule(train_path=s2ef_path, representation="point_cloud").avg_num_neighbors is None


@pytest.mark.parametrize("module", [S2EFDataModule, IS2REDataModule])
def test_from_devset_gives_batches_for_every_split(module):
    dm = module.from_devset()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.num_structures == 8 and batch.num_edges > 0
    assert next(iter(dm.val_dataloader())).num_structures == 8
    dm.setup("test")
    assert next(iter(dm.test_dataloader())).num_structures >= 1


class TrainingOrder(pl.Callback):
    """The structure ids of every training batch, per epoch."""

    def __init__(self):
        self.epochs: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.epochs.setdefault(trainer.current_epoch, []).extend(batch.sid.tolist())


def test_a_resumed_run_sees_the_batches_of_the_uninterrupted_one(tmp_path):
    # each epoch's order is seeded by (seed, epoch) and Lightning sets the epoch after a resume, so
    # the loader rebuilt by the resumed Trainer does not start over at epoch 0's order
    def fit(epochs: int, ckpt_path=None) -> tuple[TrainingOrder, pl.Trainer]:
        datamodule = IS2REDataModule.from_devset(batch_size=8, seed=3)
        datamodule.setup("fit")
        torch.manual_seed(0)
        task = IS2RETask(tiny_egnn(), statistics=datamodule.target_statistics)
        order = TrainingOrder()
        trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=4, limit_val_batches=0, callbacks=[order])
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        return order, trainer

    whole, _ = fit(3)
    first, trainer = fit(1)
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed, _ = fit(3, ckpt_path=tmp_path / "epoch0.ckpt")
    assert sorted(whole.epochs) == [0, 1, 2] and sorted(resumed.epochs) == [1, 2]
    assert len(whole.epochs[0]) == 32 and first.epochs[0] == whole.epochs[0]
    assert resumed.epochs[1] == whole.epochs[1] and resumed.epochs[2] == whole.epochs[2]
    assert whole.epochs[1] != whole.epochs[0] and whole.epochs[2] != whole.epochs[1]
