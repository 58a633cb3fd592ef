"""LightningDataModules for the S2EF and IS2RE tasks.

``setup(stage)`` opens only the splits that stage needs; graphs (or point clouds) are
built per record in the DataLoader workers, so ``num_workers`` parallelises the whole
pipeline. ``from_devset()`` gives laptop-sized defaults over the shipped devsets.
Training and validation may each be several datasets (:mod:`matsciml.data.mixture`).
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from matsciml.data import keys as K
from matsciml.data.batch import collate
from matsciml.data.datasets import IS2REDataset, LMDBDataset, S2EFDataset, Transform
from matsciml.data.devsets import DEVSETS, devset_path
from matsciml.data.formats.card import DatasetStatistics, stale_statistics
from matsciml.data.grouped_eval import GroupedBatchSampler
from matsciml.data.min_distance import DEFAULT_MIN_DISTANCE, MinDistance, check_min_distance_setting
from matsciml.data.mixture import MixtureDataset, check_weights, dataset_names, open_datasets, split_paths
from matsciml.data.neighbors import DEFAULT_CUTOFF, DEFAULT_MAX_NEIGHBORS, RadiusGraph
from matsciml.data.pointcloud import DEFAULT_NUM_SPECIES, DEFAULT_NUM_SUBSURFACE, PointCloudCollate, PointCloudSample
from matsciml.data.pooled_card import pool_cards
from matsciml.data.progress import progress_bar
from matsciml.data.samplers import (
    AtomBalancedBatchSampler,
    BatchSamplerLoader,
    DistributedBatchLoader,
    UnpaddedDistributedSampler,
    distributed_context,
)

Representation = Literal["graph", "point_cloud"]
#: records whose radius graphs estimate the average number of neighbours (a few seconds at most)
NEIGHBOR_SAMPLE = 500
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class AtomisticDataModule(pl.LightningDataModule):
    """Shared logic of :class:`S2EFDataModule` and :class:`IS2REDataModule`.

    Args:
        train_path, val_path, test_path, predict_path: dataset file or directory per split;
            ``train_path`` and ``val_path`` may list several datasets of this task (see ``weights``, ``names``).
        batch_size: structures per batch.
        num_workers: DataLoader worker processes (0 reads in the main process).
        representation: ``"graph"`` (radius graph) or ``"point_cloud"`` (padded clouds).
        graph_backend: batch type of graph loaders: ``"native"`` (our ``Batch``), ``"dgl"``
            (a batched ``dgl.DGLGraph``) or ``"pyg"`` (a ``torch_geometric`` ``Batch``); see docs/backends.md.
        cutoff: radius-graph cutoff in Å.
        max_neighbors: neighbours kept per atom, nearest first; ``None`` (default): every pair
            within the cutoff. A cap (the OC20 baselines used 50 at 6 Å) falls inside coordination
            shells, so energies jump where neighbours swap rank; a task records it and applies it at
            inference, with a warning.
        num_subsurface: IS2RE point clouds: sub-surface atoms sampled into each cloud (``None``: the
            paper's 8). S2EF point clouds hold every atom and refuse it (see :meth:`record_transforms`).
        num_species: one-hot width of point-cloud features (atomic numbers 1..num_species).
        transforms: extra record transforms, applied before the graph is built.
        shuffle: shuffle the training split each epoch.
        seed: seed of the training shuffle and the point-cloud sampling.
        pin_memory: pin batches for faster host-to-GPU copies (defaults to CUDA availability).
        statistics_sample: records read to estimate element set and target statistics of
            datasets without a metadata card (legacy OC20 files); matsciml files carry exact ones.
        balanced: with more than one process (DDP), give every rank about the same number of atoms
            per training step (:class:`~matsciml.data.samplers.AtomBalancedBatchSampler`, from the
            metadata's atom counts); ``False``: plain shuffled distributed batches. Evaluation splits
            are always shared without padding (every structure once). No effect in one process.
        min_distance: a record with two atoms closer than this (Å, periodic images included) is
            refused with its file, record and atom indices (``0``: no check); see
            :mod:`matsciml.data.min_distance`. Atoms without neighbours are valid.
        weights: with several ``train_path`` datasets, the fraction of each training epoch drawn from
            each (normalised to sum to one; an epoch has as many structures as all of them together;
            :mod:`matsciml.data.mixture`); ``None``: every record once per epoch. Species, target
            statistics and composition sums pool every record of every training dataset once, whatever
            the weights (:mod:`matsciml.data.pooled_card`).
        names: with several ``val_path`` datasets, the name of each in its metrics ``val/<name>/<metric>``
            (default: the folder names); ``val/<metric>`` stays the value over all of them
            (:mod:`matsciml.data.grouped_eval`).
    """

    task: ClassVar[str]
    dataset_class: ClassVar[type[LMDBDataset]]

    def __init__(
        self,
        train_path: list[str] | str | os.PathLike | None = None,
        val_path: list[str] | str | os.PathLike | None = None,
        test_path: str | os.PathLike | None = None,
        predict_path: str | os.PathLike | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        representation: Representation = "graph",
        cutoff: float = DEFAULT_CUTOFF,
        max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
        num_subsurface: int | None = None,
        num_species: int = DEFAULT_NUM_SPECIES,
        transforms: list[Transform] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        statistics_sample: int = 10_000,
        balanced: bool = True,
        graph_backend: Literal["native", "dgl", "pyg"] = "native",
        min_distance: float = DEFAULT_MIN_DISTANCE,
        weights: list[float] | None = None,
        names: list[str] | None = None,
    ):
        super().__init__()
        self.min_distance = check_min_distance_setting(min_distance)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if representation not in ("graph", "point_cloud"):
            raise ValueError(f"representation must be 'graph' or 'point_cloud', got {representation!r}")
        if graph_backend not in ("native", "dgl", "pyg"):
            raise ValueError(f"graph_backend must be 'native', 'dgl' or 'pyg', got {graph_backend!r}")
        if representation == "point_cloud" and graph_backend != "native":
            raise ValueError(
                f"graph_backend={graph_backend!r} needs representation='graph'; point clouds are only batched natively"
            )
        self.graph_backend = graph_backend
        # plain strings: hyperparameters go into checkpoints, which load with weights_only=True
        train_path, val_path = split_paths("train_path", train_path), split_paths("val_path", val_path)
        test_path, predict_path = (None if p is None else os.fspath(p) for p in (test_path, predict_path))
        self.paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path}
        self.weights = check_weights(weights, train_path)
        if names is not None and not isinstance(val_path, list):
            raise ValueError("names name the datasets of a val_path list; val_path is one dataset (or none)")
        self.names = {
            split: dataset_names(paths, names if split == "val" else None, f"{split}_path")
            for split, paths in (("train", train_path), ("val", val_path))
            if isinstance(paths, list)
        }
        if all(p is None for p in self.paths.values()):
            raise ValueError(
                "give at least one of train_path, val_path, test_path, predict_path (or use from_devset())"
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.representation = representation
        self.cutoff = cutoff
        self.max_neighbors = max_neighbors
        self.num_subsurface = num_subsurface
        self.num_species = num_species
        self.extra_transforms = list(transforms or [])
        self.shuffle = shuffle
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.statistics_sample = statistics_sample
        self.balanced = balanced
        self.datasets: dict[str, LMDBDataset] = {}
        self._sampled_card: dict | None = None
        self._avg_num_neighbors: float | None = None
        self.save_hyperparameters(ignore=["transforms"])

    @classmethod
    def from_devset(
        cls, batch_size: int = 8, num_workers: int = 0, devset: str | None = None, **kwargs
    ) -> AtomisticDataModule:
        """A shipped devset (train/val/test; predict on test): this task's, or ``devset``.

        Args:
            devset: a devset of this task's format (see ``matsciml.data.devsets.DEVSETS``),
                e.g. ``"md"`` for S2EF; default: the one named after the task.

        Raises:
            ValueError: ``devset`` is unknown or holds another task's records.
        """
        devset = cls.task if devset is None else devset
        if DEVSETS.get(devset, cls.task) != cls.task:
            raise ValueError(
                f"devset {devset!r} holds {DEVSETS[devset]} records; {cls.__name__} reads"
                f" {cls.task}: choose one of {tuple(n for n, t in DEVSETS.items() if t == cls.task)}"
            )
        paths = {f"{split}_path": devset_path(devset, split) for split in ("train", "val", "test")}
        paths["predict_path"] = paths["test_path"]
        return cls(**{**paths, **kwargs}, batch_size=batch_size, num_workers=num_workers)

    # -- datasets -----------------------------------------------------------------------
    def record_transforms(self) -> list[Transform]:
        """The transforms every record of every split goes through.

        Point clouds: S2EF keeps every atom, since its targets (the energy and forces of the
        whole structure) depend on every atom; IS2RE samples sub-surface atoms as the paper
        does (:class:`~matsciml.data.pointcloud.PointCloudSample`), its relaxed energy being
        a property of the adsorbate and the surface.
        """
        if self.representation == "graph":  # its neighbour list gives the shortest distance for free
            return [*self.extra_transforms, RadiusGraph(self.cutoff, self.max_neighbors, self.min_distance)]
        close_atoms = [MinDistance(self.min_distance)] if self.min_distance > 0 else []
        if self.task == "s2ef":
            if self.num_subsurface is not None:
                raise ValueError(
                    f"num_subsurface={self.num_subsurface} samples the atoms of a point cloud, but S2EF "
                    "targets are the energy and forces of every atom; remove num_subsurface (S2EF point "
                    "clouds hold every atom)"
                )
            return [*self.extra_transforms, *close_atoms]
        num_subsurface = DEFAULT_NUM_SUBSURFACE if self.num_subsurface is None else self.num_subsurface
        return [*self.extra_transforms, *close_atoms, PointCloudSample(num_subsurface, self.seed)]

    def collate_fn(self):
        if self.representation != "graph":
            return PointCloudCollate(self.num_species)
        if self.graph_backend == "native":
            return collate
        from matsciml.data.backends import collate_function  # DGL / PyG load only when asked for

        return collate_function(self.graph_backend)

    def setup(self, stage: str | None = None) -> None:
        splits = _STAGE_SPLITS.get(stage, tuple(self.paths)) if stage else tuple(self.paths)
        for split in splits:
            path = self.paths[split]
            if path is None or split in self.datasets:
                continue
            if isinstance(path, list):  # several datasets of this task, read as one split
                parts = open_datasets(f"{split}_path", path, self.task, self._open)
                weights = self.weights if split == "train" else None
                self.datasets[split] = MixtureDataset(parts, self.names[split], weights)
            else:
                self.datasets[split] = self._open(path)

    def _open(self, path: str) -> LMDBDataset:
        return self.dataset_class(path, transforms=self.record_transforms())

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            if self.paths[split] is None:
                raise ValueError(f"{type(self).__name__} has no {split}_path; set it to use the {split} split")
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        world, rank = distributed_context(self.trainer) or (1, 0)
        dataset = self.datasets[split]
        common = dict(
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        # --trainer.overfit_batches: Lightning swaps the sampler for a SequentialSampler, which it can do in
        # a plain DataLoader only; an overfitting run repeats a few batches and has no epoch order to resume
        # (nor, with several validation datasets, per-dataset metrics)
        overfitting = getattr(self.trainer, "overfit_batches", 0) if self.trainer is not None else 0
        if split == "train" and not overfitting:
            # one process or many, the order of epoch e is a permutation seeded by (seed, e) (Lightning sets
            # the epoch), and the loader is stateful: a checkpoint taken mid-epoch resumes at the next batch.
            # One process has nothing to balance: natoms=None keeps the permutation's consecutive batches.
            natoms = dataset.natoms() if self.balanced and world > 1 else None
            draw = dataset if isinstance(dataset, MixtureDataset) else None  # the weighted draw of each epoch
            sampler = AtomBalancedBatchSampler(
                dataset, self.batch_size, world, rank, natoms=natoms, shuffle=shuffle, seed=self.seed, draw=draw
            )
            return BatchSamplerLoader(dataset, batch_sampler=sampler, **common)
        if split == "val" and isinstance(dataset, MixtureDataset) and not overfitting:  # per-dataset metrics
            grouped = GroupedBatchSampler(dataset, self.batch_size, world, rank)
            return DistributedBatchLoader(dataset, batch_sampler=grouped, **common)
        if world == 1:
            return DataLoader(dataset, batch_size=self.batch_size, **common)
        # loaders Lightning keeps as they are (their samplers are ``DistributedSampler`` subclasses)
        sampler = UnpaddedDistributedSampler(dataset, world, rank)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    # -- what the data knows (linked into models by the CLI) ---------------------------
    def _card(self) -> dict | None:
        """The first available split's card (pooled over its datasets, :func:`dataset_card`)."""
        for split in ("train", "val", "test", "predict"):
            if self.paths[split] is not None:
                self.setup({"train": "fit", "val": "validate"}.get(split, split))
                if self._sampled_card is None:
                    self._sampled_card = dataset_card(self.datasets[split], self.statistics_sample, self.seed)
                return self._sampled_card
        return None

    @property
    def species(self) -> list[int] | None:
        """Atomic numbers present in the first available split (all its datasets), from the metadata cards."""
        card = self._card()
        return None if card is None else sorted(int(z) for z in card["elements"])

    @property
    def target_statistics(self) -> dict | None:
        """Mean/std/min/max of the targets in the first available split (eV, eV/Å)."""
        card = self._card()
        return None if card is None else card["statistics"]

    @property
    def avg_num_neighbors(self) -> float | None:
        """Mean neighbours per atom on this data's radius graph (cutoff, max_neighbors), over a seeded
        sample of up to :data:`NEIGHBOR_SAMPLE` records of the training split (else the first split
        given). Equivariant models divide their neighbour sums by its square root. ``None`` for
        point clouds."""
        if self.representation != "graph":
            return None
        if self._avg_num_neighbors is None:
            split = next((s for s in ("train", "val", "test", "predict") if self.paths[s] is not None), None)
            if split is None:
                return None
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
            self._avg_num_neighbors = mean_neighbors(self.datasets[split], NEIGHBOR_SAMPLE, self.seed)
        return self._avg_num_neighbors

    def natoms(self, split: str = "train") -> np.ndarray | None:
        """Atom counts of a split, from its metadata (for balanced batching)."""
        self.setup({"train": "fit", "val": "validate"}.get(split, split))
        return self.datasets[split].natoms()


def dataset_card(dataset: LMDBDataset | MixtureDataset, sample: int, seed: int) -> dict:
    """A dataset's card; for files without one (OC20), an estimate from ``sample`` records; for a
    mixture, the cards of its datasets pooled (:func:`~matsciml.data.pooled_card.pool_cards`).

    Cards written before the composition sums and free-atom force statistics existed (the
    shipped devsets') are recomputed from every record of that dataset, once, in one pass.
    """
    if isinstance(dataset, MixtureDataset):
        return pool_cards([dataset_card(part, sample, seed) for part in dataset.datasets])
    if dataset.metadata is not None and not stale_statistics(dataset.metadata):
        return dataset.metadata
    if dataset.metadata is None:
        return sampled_card(dataset, sample, seed)
    return {**dataset.metadata, **sampled_card(dataset, len(dataset), seed)}


def sampled_card(dataset: LMDBDataset, sample: int, seed: int) -> dict:
    """Element set and target statistics from a seeded sample of ``sample`` records (all when
    ``sample >= len(dataset)``); the records are read without transforms (no graphs built)."""
    count = min(sample, len(dataset))
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    statistics = DatasetStatistics(dataset.task)
    with progress_bar(Console(stderr=True), "records") as bar:
        job = bar.add_task(f"statistics of {dataset.path.name} ({count} of {len(dataset)} records)", total=count)
        for index in indices:
            statistics.add(dataset.read(int(index)))
            bar.advance(job)
    return statistics.summary()


def mean_neighbors(dataset: LMDBDataset, sample: int, seed: int) -> float:
    """Edges per atom of the graphs the dataset's transforms build, over a seeded sample of ``sample``
    records (all when ``sample >= len(dataset)``)."""
    count = min(sample, len(dataset))
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=count, replace=False))
    edges = atoms = 0
    for index in indices:
        record = dataset[int(index)]
        edges += record[K.EDGE_INDEX].shape[1]
        atoms += len(record[K.ATOMIC_NUMBERS])
    return edges / atoms


class S2EFDataModule(AtomisticDataModule):
    """Structure to energy and forces (OC20 S2EF): records carry ``energy`` and ``forces``."""

    task = "s2ef"
    dataset_class = S2EFDataset


class IS2REDataModule(AtomisticDataModule):
    """Initial structure to relaxed energy (OC20 IS2RE): records carry ``relaxed_energy``."""

    task = "is2re"
    dataset_class = IS2REDataset


class S2EFDGLDataModule(S2EFDataModule):
    """:class:`S2EFDataModule` yielding batched ``dgl.DGLGraph`` (``graph_backend="dgl"``), the paper's name."""

    def __init__(self, *args, graph_backend: Literal["native", "dgl", "pyg"] = "dgl", **kwargs):
        super().__init__(*args, graph_backend=graph_backend, **kwargs)


class IS2REDGLDataModule(IS2REDataModule):
    """:class:`IS2REDataModule` yielding batched ``dgl.DGLGraph`` (``graph_backend="dgl"``), the paper's name."""

    def __init__(self, *args, graph_backend: Literal["native", "dgl", "pyg"] = "dgl", **kwargs):
        super().__init__(*args, graph_backend=graph_backend, **kwargs)
