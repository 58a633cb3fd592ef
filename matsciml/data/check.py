"""``matsciml data check``: read every record, build graphs and batches, report problems.

This is the data pipeline a training run uses, end to end, without a model: a corrupt
record, a missing target or two atoms closer than ``min_distance`` fail here with a message
naming the file and record, before any GPU time is spent. It also says which integrity
checks the dataset allows (:mod:`matsciml.data.integrity`); ``verify=True`` recomputes the
card's content hash first.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader, Subset

from matsciml.data.batch import collate
from matsciml.data.datasets import LMDBDataset
from matsciml.data.formats.store import CHECKSUM_VERSION
from matsciml.data.integrity import integrity_notes, verify_content_hash
from matsciml.data.min_distance import DEFAULT_MIN_DISTANCE
from matsciml.data.neighbors import DEFAULT_CUTOFF, DEFAULT_MAX_NEIGHBORS, RadiusGraph
from matsciml.data.progress import progress_bar


def check_dataset(
    path: str | Path,
    task: str | None = None,
    batch_size: int = 8,
    cutoff: float = DEFAULT_CUTOFF,
    max_neighbors: int | None = DEFAULT_MAX_NEIGHBORS,
    num_workers: int = 0,
    limit: int | None = None,
    console: Console | None = None,
    verify: bool = False,
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> dict:
    """Iterate the whole dataset as training would and print what was seen.

    Args:
        verify: first recompute the card's SHA-256 content hash over every stored byte (always
            done for codec v1 data, which has no per-record checksums).
        min_distance: refuse atoms closer than this (Å; :mod:`matsciml.data.min_distance`).

    Returns:
        Counts of structures, atoms and edges, and the elapsed time in seconds.

    Raises:
        DataError: a bad record, shard set or (with ``verify``) content hash.
    """
    console = console or Console()
    dataset = LMDBDataset(path, transforms=[RadiusGraph(cutoff, max_neighbors, min_distance)], task=task)
    notes = integrity_notes(dataset.metadata)
    unchecked = dataset.metadata is not None and dataset.metadata.get("codec_version", 1) < CHECKSUM_VERSION
    for note in notes:
        console.print(f"integrity: {note}", soft_wrap=True, markup=False, highlight=False)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    totals = {"structures": 0, "atoms": 0, "edges": 0}
    first = None
    start = time.perf_counter()
    with progress_bar(console) as progress:
        bar = progress.add_task("checking", total=len(dataset))
        for batch in loader:
            first = first or batch
            totals["structures"] += batch.num_structures
            totals["atoms"] += batch.num_atoms
            totals["edges"] += batch.num_edges
            progress.advance(bar, batch.num_structures)
    # without per-record CRCs (codec v1, e.g. the shipped devsets) the content hash is the only
    # guard against a flipped bit: verify it by default there, after the records (a record's own
    # error names it; the hash only says that something changed)
    if verify or unchecked:
        verified = f"content hash verified ({verify_content_hash(path)})" if dataset.metadata is not None else None
        note = verified or "no content hash to verify (legacy OC20 files have none)"
        console.print(f"integrity: {note}", soft_wrap=True, markup=False, highlight=False)
    totals["seconds"] = time.perf_counter() - start
    console.print(f"first batch: {first!r}", soft_wrap=True, markup=False, highlight=False)
    rate = totals["structures"] / max(totals["seconds"], 1e-9)
    console.print(
        f"[green]checked[/green] {totals['structures']:,} structures, {totals['atoms']:,} atoms, "
        f"{totals['edges']:,} edges ({totals['edges'] / max(totals['atoms'], 1):.1f} neighbours per atom, "
        f"cutoff {cutoff} Å, max_neighbors {max_neighbors or 'all'}) in {totals['seconds']:.2f} s "
        f"({rate:,.0f} structures/s, {torch.get_num_threads()} torch threads): no problems found"
    )
    return totals
