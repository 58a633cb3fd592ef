"""Data pipeline throughput: LMDB -> validated record -> periodic radius graph -> Batch.

Measures, in one run and on the same records:

* ``pipeline``: the DataModule path (S2EFDataset + RadiusGraph + collate in a DataLoader),
  with ``num_workers`` 0, 1 and 2;
* ``ase``: the same pipeline with ``ase.neighborlist.neighbor_list`` building the graph;
* ``raw``: LMDB reads + decoding + vesin alone (no validation, no neighbour capping, no
  batching) - the floor the pipeline is compared with;
* ``decode``: LMDB reads + decoding alone, with and without the per-record CRC-32 check
  (issue 13), alternating so both see the same cache and load.

Targets (issue 2): pipeline >= 20x ase; pipeline (1 worker) within 1.5x of raw;
2 workers >= 1.6x one worker.

Usage::

    python experiments/bench_data.py                     # devset + 10k synthetic set
    python experiments/bench_data.py --synthetic 2000    # quicker
    python experiments/bench_data.py --max-neighbors 50  # the OC20 baselines' cap (default: none)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import vesin
from ase import Atoms
from ase.neighborlist import neighbor_list
from torch.utils.data import DataLoader, Subset

from matsciml.data.batch import collate
from matsciml.data.datasets import S2EFDataset
from matsciml.data.devsets import devset_path
from matsciml.data.formats import lmdb_shards, store
from matsciml.data.neighbors import RadiusGraph, neighbor_calculator

CUTOFF, BATCH_SIZE = 6.0, 8


class AseRadiusGraph(RadiusGraph):
    """RadiusGraph with ASE's neighbour list in place of vesin (same capping and order)."""

    def __call__(self, record):
        atoms = Atoms(
            numbers=record["atomic_numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"]
        )
        i, j, shifts, distances = neighbor_list("ijSd", atoms, self.cutoff)
        rank = np.rint(distances / 1e-6).astype(np.int64)
        order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, rank, i))
        i, j, shifts = i[order], j[order], shifts[order]
        cap = len(i) if self.max_neighbors is None else self.max_neighbors
        keep = np.arange(len(i)) - np.searchsorted(i, i) < cap
        record["edge_index"] = np.stack([j[keep], i[keep]]).astype(np.int64)
        record["cell_shifts"] = shifts[keep].astype(np.int64)
        return record


def time_pipeline(path: Path, graph: RadiusGraph, num_workers: int, limit: int | None) -> tuple[float, int]:
    dataset = S2EFDataset(path, transforms=[graph])
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, num_workers=num_workers, collate_fn=collate, persistent_workers=False
    )
    start = time.perf_counter()
    count = sum(batch.num_structures for batch in loader)
    return count / (time.perf_counter() - start), count


def time_raw(path: Path, limit: int | None) -> tuple[float, int]:
    """LMDB reads, decoding and vesin: what any pipeline over these files must pay."""
    calculator = neighbor_calculator(CUTOFF)  # the pipeline's own vesin settings
    count = 0
    start = time.perf_counter()
    for value in _stored_values(path, limit):
        record = store.decode(value)
        positions = record["positions"].astype(np.float64)
        calculator.compute(positions, record["cell"].astype(np.float64), record["pbc"], quantities="ijS")
        count += 1
    return count / (time.perf_counter() - start), count


def _stored_values(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """Every stored record value of a matsciml dataset, shard by shard (the first ``limit``)."""
    count = 0
    for shard in lmdb_shards.shard_paths(path):
        env = lmdb_shards.reader(shard)
        with env.begin() as txn:
            for key in range(store.read_metadata(env, shard)["shard"]["count"]):
                if limit is not None and count >= limit:
                    return
                yield txn.get(lmdb_shards.record_key(key))
                count += 1


def time_decode(path: Path, verify: bool) -> tuple[float, int]:
    """LMDB reads and decoding alone: the floor the CRC-32 check of every read adds to."""
    count = 0
    start = time.perf_counter()
    for value in _stored_values(path):
        store.decode(value, verify=verify)
        count += 1
    return count / (time.perf_counter() - start), count


def bench_checksum(path: Path, pipeline_rate: float, repeats: int = 5) -> None:
    """Best of ``repeats`` alternating passes each way, so neither side gets a warmer cache;
    the extra time per record is also given as a share of the pipeline's time per structure."""
    card = store.read_metadata(lmdb_shards.reader(lmdb_shards.shard_paths(path)[0]), path)
    if card.get("codec_version", 1) < store.CHECKSUM_VERSION:
        print(f"decode: codec v{card.get('codec_version', 1)} records carry no CRC-32 (nothing to verify)")
        return
    rates = {True: [], False: []}
    for _ in range(repeats):
        for verify in (False, True):
            rate, n = time_decode(path, verify)
            rates[verify].append(rate)
    plain, checked = max(rates[False]), max(rates[True])
    print(f"LMDB + decode, no CRC check {plain:>9.0f} records/s  ({n} records, best of {repeats})")
    extra = 1 / checked - 1 / plain  # seconds per record
    print(
        f"LMDB + decode + CRC-32      {checked:>9.0f} records/s  (+{1e6 * extra:.1f} µs per record: "
        f"{100 * extra * plain:+.1f}% of decoding, {100 * extra * pipeline_rate:+.2f}% of the pipeline)"
    )


def bench(name: str, path: Path, ase_limit: int, max_neighbors: int | None) -> dict:
    print(f"\n== {name}: {path}")
    torch.set_num_threads(1)
    results = {}
    results["raw"], n_raw = time_raw(path, None)
    print(f"raw LMDB + decode + vesin   {results['raw']:>9.0f} structures/s  ({n_raw} structures)")
    for workers in (0, 1, 2):
        rate, n = time_pipeline(path, RadiusGraph(CUTOFF, max_neighbors), workers, None)
        results[f"pipeline_w{workers}"] = rate
        print(f"pipeline, num_workers={workers}    {rate:>9.0f} structures/s  ({n} structures)")
    results["ase"], n_ase = time_pipeline(path, AseRadiusGraph(CUTOFF, max_neighbors), 0, ase_limit)
    print(f"pipeline with ASE neighbours {results['ase']:>8.1f} structures/s  ({n_ase} structures)")
    speedup_ase = results["pipeline_w0"] / results["ase"]
    overhead = results["raw"] / results["pipeline_w0"]
    scaling = results["pipeline_w2"] / results["pipeline_w1"]
    print(
        f"vesin pipeline vs ASE pipeline: {speedup_ase:.1f}x (target >= 20x) {'OK' if speedup_ase >= 20 else 'MISSED'}"
    )
    print(f"pipeline cost vs raw:           {overhead:.2f}x (target <= 1.5x) {'OK' if overhead <= 1.5 else 'MISSED'}")
    print(f"2 workers vs 1 worker:          {scaling:.2f}x (target >= 1.6x) {'OK' if scaling >= 1.6 else 'MISSED'}")
    bench_checksum(path, results["pipeline_w0"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, default=10_000, help="size of the synthetic set (0: skip)")
    parser.add_argument("--ase-limit", type=int, default=200, help="structures timed with the slow ASE path")
    parser.add_argument("--max-neighbors", type=int, default=None, help="neighbour cap (default: none, as the data)")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, vesin {vesin.__version__}, cutoff {CUTOFF} Å, "
        f"max_neighbors {args.max_neighbors}, batch {BATCH_SIZE}"
    )
    bench("S2EF devset (train)", devset_path("s2ef", "train"), args.ase_limit, args.max_neighbors)
    if args.synthetic:
        from matsciml.data.synthetic import write_synthetic

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic"
            start = time.perf_counter()
            write_synthetic(path, num_structures=args.synthetic, task="s2ef", seed=0)
            print(f"\n(wrote {args.synthetic} synthetic structures in {time.perf_counter() - start:.1f} s)")
            bench(f"synthetic {args.synthetic}", path, args.ase_limit, args.max_neighbors)


if __name__ == "__main__":
    main()
