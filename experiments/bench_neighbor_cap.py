"""What the neighbour cap saves: EGNN S2EF training steps with every pair within 6 Å against the 50 nearest.

Two batches of 8 structures, each built twice by the data modules' radius graph (``max_neighbors=None``,
the default, and ``50``, the OC20 baselines' opt-in cap):

* **devset**: the first batch of the shipped S2EF devset's train split (surface slabs with vacuum);
* **bulk**: 8 rattled 3x3x3 fcc Cu supercells (108 atoms, 78 neighbours per atom within 6 Å, where the
  cap drops a third of the edges).

A step is what Lightning runs for a batch (forward, forces with ``create_graph=True``, L1 energy + force
loss, backward, Adam). The two graphs alternate step by step in one process, so drifting load from other
processes hits both alike; figures are medians over the timed steps.

Usage::

    python experiments/bench_neighbor_cap.py             # ~1 min on the 2-core VM
    python experiments/bench_neighbor_cap.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ase.build import bulk

from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.neighbors import OC20_MAX_NEIGHBORS
from matsciml.data.structures import batch_from_atoms
from matsciml.models import EGNN
from matsciml.tasks.s2ef import S2EFTask


def devset_batch(max_neighbors: int | None):
    data = S2EFDataModule.from_devset(batch_size=8, shuffle=False, max_neighbors=max_neighbors)
    return next(iter(data.train_dataloader()))


def bulk_batch(max_neighbors: int | None):
    crystals = []
    for seed in range(8):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
        atoms.rattle(stdev=0.05, seed=seed)
        crystals.append(atoms)
    batch = batch_from_atoms(crystals, max_neighbors=max_neighbors)
    return batch.replace(energy=torch.zeros(len(crystals)), forces=torch.zeros_like(batch.positions))


def time_steps(batches: dict[str, object], steps: int, warmup: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    task = S2EFTask(EGNN(), lr=1e-3).train()
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-3)
    times = {name: [] for name in batches}
    for step in range(warmup + steps):
        for name, batch in batches.items():
            start = time.perf_counter()
            loss, _ = task.step(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per graph")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"EGNN S2EF training step, batches of 8, {args.threads} torch thread(s), median of {args.steps} steps")
    print("| batch | graph | atoms | edges | edges/atom | ms/step | vs cap |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, make in (("devset", devset_batch), ("bulk", bulk_batch)):
        batches = {"no cap": make(None), f"cap {OC20_MAX_NEIGHBORS}": make(OC20_MAX_NEIGHBORS)}
        medians = {k: statistics.median(v) * 1e3 for k, v in time_steps(batches, args.steps, args.warmup).items()}
        capped = medians[f"cap {OC20_MAX_NEIGHBORS}"]
        for graph, batch in batches.items():
            print(
                f"| {name} | {graph} | {batch.num_atoms} | {batch.num_edges:,} "
                f"| {batch.num_edges / batch.num_atoms:.1f} | {medians[graph]:.0f} | {medians[graph] / capped:.2f}x |"
            )


if __name__ == "__main__":
    main()
