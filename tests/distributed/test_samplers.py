"""Unit tests of the DDP samplers: coverage, balance, determinism, resume, and Lightning leaving them alone."""

from __future__ import annotations

import numpy as np
import pytest

from matsciml.data.samplers import AtomBalancedBatchSampler, BatchSamplerLoader, UnpaddedDistributedSampler


@pytest.mark.parametrize("size,world", [(100, 3), (7, 2), (5, 5), (64, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_sampler_covers_every_index_exactly_once(size, world, shuffle):
    dataset = range(size)
    shares = [list(UnpaddedDistributedSampler(dataset, world, rank, shuffle=shuffle)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(UnpaddedDistributedSampler(dataset, world, r)) for r in range(world)] == list(map(len, shares))


def test_eval_sampler_refuses_more_ranks_than_structures():
    with pytest.raises(ValueError, match="at least one"):
        UnpaddedDistributedSampler(range(2), 3, 0)


def samplers(natoms, batch_size, world, **kwargs):
    return [
        AtomBalancedBatchSampler(range(len(natoms)), batch_size, world, rank, natoms=natoms, **kwargs)
        for rank in range(world)
    ]


@pytest.mark.parametrize("size,batch_size,world", [(200, 4, 2), (203, 4, 3), (50, 8, 4), (9, 4, 2)])
def test_training_batches_are_balanced_and_cover_the_epoch(size, batch_size, world):
    natoms = np.random.default_rng(size).integers(10, 200, size=size)
    per_rank = [s.epoch_batches() for s in samplers(natoms, batch_size, world, seed=3)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps: no rank waits at the all-reduce
    assert all(len(batch) >= 1 for batches in per_rank for batch in batches)
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(size))
    assert len(seen) - size < world  # only the top-up of a short last step repeats structures
    full = [
        np.ptp([natoms[b].sum() for b in step])
        for step in zip(*per_rank, strict=True)
        if all(len(b) == batch_size for b in step)
    ]
    assert max(full, default=0) <= natoms.max()  # within one structure's size
    if full:  # and much better than batches of random structures
        rng = np.random.default_rng(0)
        random = [
            np.ptp(natoms[rng.permutation(size)[: world * batch_size]].reshape(world, -1).sum(1)) for _ in range(200)
        ]
        assert np.mean(full) < np.mean(random) / 2


def test_training_batches_are_deterministic_per_seed_and_epoch():
    natoms = np.random.default_rng(1).integers(10, 100, size=60)
    a, b = samplers(natoms, 4, 2, seed=7)[0], samplers(natoms, 4, 2, seed=7)[0]
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(samplers(natoms, 4, 2, seed=8)[0]) != first
    a.set_epoch(0)
    assert list(a) == first and len(a) == len(first)


def test_unknown_atom_counts_give_plain_shuffled_batches():
    per_rank = [list(AtomBalancedBatchSampler(range(30), 4, 2, rank, natoms=None, seed=0)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4
    flat = sorted(i for batches in per_rank for batch in batches for i in batch)
    assert flat == list(range(30))
    assert per_rank[0][0] != [0, 1, 2, 3]


def test_resume_mid_epoch_continues_where_it_stopped():
    natoms = np.random.default_rng(2).integers(10, 100, size=80)
    sampler = samplers(natoms, 4, 2, seed=5)[1]
    sampler.set_epoch(2)
    full = list(sampler)
    loader = BatchSamplerLoader(range(80), batch_sampler=sampler, collate_fn=list)
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(3)]
    assert consumed == full[:3]
    state = loader.state_dict()
    assert state == {"epoch": 2, "seed": 5, "start_batch": 3}

    fresh = samplers(natoms, 4, 2, seed=5)[1]  # a restarted process
    resumed = BatchSamplerLoader(range(80), batch_sampler=fresh, collate_fn=list)
    resumed.load_state_dict(state)
    assert list(resumed) == full[3:]
    assert list(resumed) == full  # the offset applies once; the next pass is the whole epoch
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # a new epoch ignores an offset saved in an older one
    assert len(list(fresh)) == len(full)
    with pytest.raises(ValueError, match="seed"):
        samplers(natoms, 4, 2, seed=6)[1].load_state_dict(state)


def test_lightning_keeps_our_loaders_under_ddp():
    from torch.utils.data import DataLoader, DistributedSampler

    natoms = np.full(20, 10)
    train = BatchSamplerLoader(range(20), batch_sampler=samplers(natoms, 2, 2)[0])
    val = DataLoader(range(20), batch_size=2, sampler=UnpaddedDistributedSampler(range(20), 2, 0))
    # what Lightning's `_requires_distributed_sampler` tests before injecting its padding sampler
    assert isinstance(train.sampler, DistributedSampler) and isinstance(val.sampler, DistributedSampler)
    assert len(train) == 5 and len(val) == 5


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_lightning_resumes_mid_epoch_at_the_next_batch(tmp_path):
    """A checkpoint taken after step 3 resumes with batch 3 of the same epoch (one process suffices)."""
    import lightning.pytorch as pl
    import torch
    from helpers.training import tiny_egnn
    from lightning.pytorch.callbacks import ModelCheckpoint

    from matsciml.data.datamodules import S2EFDataModule
    from matsciml.tasks import S2EFTask

    datamodule = S2EFDataModule.from_devset(batch_size=4)
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    seen = []

    class Recording(S2EFTask):
        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch_idx, batch.sid.tolist(), batch.fid.tolist()))
            return super().training_step(batch, batch_idx)

    def fit(max_steps, callbacks=(), ckpt_path=None):
        loader = BatchSamplerLoader(
            dataset,
            batch_sampler=AtomBalancedBatchSampler(dataset, 4, 1, 0, natoms=dataset.natoms(), seed=0),
            collate_fn=datamodule.collate_fn(),
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            limit_val_batches=0,
        )
        torch.manual_seed(0)
        trainer.fit(
            Recording(tiny_egnn(), statistics=datamodule.target_statistics),
            train_dataloaders=loader,
            ckpt_path=ckpt_path,
        )

    fit(5, [ModelCheckpoint(dirpath=tmp_path / "first", every_n_train_steps=3, save_top_k=-1)])
    first, seen[:] = list(seen), []
    fit(
        6,
        [ModelCheckpoint(dirpath=tmp_path / "resumed", every_n_train_steps=3, save_top_k=-1)],
        ckpt_path=tmp_path / "first" / "epoch=0-step=3.ckpt",
    )
    assert [s[:2] for s in seen] == [(0, 3), (0, 4), (0, 5)]
    assert seen[:2] == first[3:5]  # the very batches the interrupted run would have trained on
