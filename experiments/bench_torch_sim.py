"""Batched FIRE with torch-sim against ASE's FIRE looping over the same structures, same model, same run.

Both relax the first frame of ``--structures`` systems of the S2EF devset (rattled by ``--rattle`` Å,
seeded), without constraints (torch-sim 0.3 has none, so the ASE side drops the slabs' FixAtoms to
solve the same problem), with the same model (float32, every neighbour within the cutoff), the
same FIRE settings (torch-sim's ``ase_fire`` flavour, ASE's defaults: dt 0.1, dt_max 1.0, max step
0.2 Å) and the same ``--fmax`` on the largest atomic force (default: a tenth of the largest starting
force; the briefly trained model has gentle forces). torch-sim relaxes all structures in one
``SimState`` (``torch_sim.optimize``; converged systems leave the batch); ASE relaxes one after
another through :class:`~matsciml.integrations.calculators.MatSciMLCalculator`. The two paths run
alternately, ``--repeats`` times each, and the table gives the median. Usage::

    .venv/bin/python experiments/bench_torch_sim.py                 # 16 slabs, a model trained here (~4 min)
    .venv/bin/python experiments/bench_torch_sim.py --checkpoint runs/.../last.ckpt --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from ase import Atoms
from ase.optimize import FIRE

from matsciml.data.datamodules import S2EFDataModule
from matsciml.data.datasets import S2EFDataset
from matsciml.data.devsets import devset_path
from matsciml.integrations.calculators import MatSciMLCalculator, load_task
from matsciml.models import EGNN
from matsciml.tasks import S2EFTask


def devset_structures(count: int, rattle: float) -> list[Atoms]:
    """The first frame of ``count`` systems of the S2EF train split, rattled, without constraints."""
    dataset = S2EFDataset(devset_path("s2ef", "train"))
    first = {}
    for index in range(len(dataset)):
        record = dataset.read(index)
        first.setdefault(int(record["sid"]), record)
    structures = []
    for seed, record in enumerate(list(first.values())[:count]):
        atoms = Atoms(
            numbers=record["atomic_numbers"],
            positions=record["positions"].astype(np.float64),
            cell=record["cell"].astype(np.float64),
            pbc=record["pbc"],
        )
        atoms.rattle(stdev=rattle, seed=seed)
        structures.append(atoms)
    if len(structures) < count:
        raise SystemExit(f"the S2EF devset train split has only {len(structures)} systems")
    return structures


def trained_task(epochs: int) -> S2EFTask:
    """A small EGNN trained ``epochs`` epochs on the S2EF devset (seeded)."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    task = S2EFTask(EGNN(hidden=16, num_layers=2, cutoff=6.0), lr=3e-3)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.fit(task, datamodule=S2EFDataModule.from_devset(batch_size=8))
    return task.eval()


def relax_torch_sim(model, structures: list[Atoms], fmax: float, max_steps: int) -> tuple[float, list[float], list]:
    """Seconds, the largest force of each relaxed system, and the number of systems of each model call."""
    import torch_sim as ts

    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    calls = []
    hook = model.register_forward_hook(lambda module, args, out: calls.append(len(out["energy"])))
    start = time.perf_counter()
    relaxed = ts.optimize(
        system=state,
        model=model,
        optimizer=ts.optimizers.fire,
        convergence_fn=ts.generate_force_convergence_fn(fmax, include_cell_forces=False),
        max_steps=max_steps,
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    hook.remove()
    forces = model(relaxed)["forces"].norm(dim=1)
    largest = torch.zeros(relaxed.n_systems, dtype=forces.dtype).scatter_reduce(
        0, relaxed.system_idx.cpu(), forces.cpu(), "amax", include_self=False
    )
    return seconds, largest.tolist(), calls


def relax_ase(calc, structures: list[Atoms], fmax: float, max_steps: int) -> tuple[float, list[float], int]:
    start, steps, largest = time.perf_counter(), 0, []
    for original in structures:
        atoms = original.copy()
        atoms.calc = calc
        optimizer = FIRE(atoms, logfile=None)
        optimizer.run(fmax=fmax, steps=max_steps)
        steps += optimizer.nsteps + 1  # one force call per step, plus the first
        largest.append(float(np.linalg.norm(atoms.get_forces(), axis=1).max()))
    return time.perf_counter() - start, largest, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structures", type=int, default=16)
    parser.add_argument("--fmax", type=float, help="eV/Å, on the largest atomic force (default: see --fmax-fraction)")
    parser.add_argument(
        "--fmax-fraction", type=float, default=0.1, help="fmax as this fraction of the largest starting force"
    )
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--rattle", type=float, default=0.05, help="Å, standard deviation")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the model trained here")
    parser.add_argument("--checkpoint", help="a checkpoint or run folder instead of training a model here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    from matsciml.integrations.torch_sim import MatSciMLModel, ts  # needs the torchsim extra

    task = load_task(args.checkpoint) if args.checkpoint else trained_task(args.epochs)
    # min_distance=0: a briefly trained model has no short-range repulsion and its minima can pull
    # atoms together; the benchmark times the two paths on the same surface, whatever it is
    model = MatSciMLModel(task, device=args.device, max_neighbors=None, min_distance=0)
    calc = MatSciMLCalculator(task, device=args.device, max_neighbors=None, min_distance=0)
    structures = devset_structures(args.structures, args.rattle)
    if args.fmax is None:
        state = ts.io.atoms_to_state(structures, model.device, model.dtype)
        args.fmax = args.fmax_fraction * float(model(state)["forces"].norm(dim=1).max())
    natoms = sum(len(atoms) for atoms in structures)
    print(
        f"{args.structures} devset slabs ({natoms} atoms), fmax {args.fmax:.4f} eV/Å, device {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Optimize has reached max steps"
        relax_torch_sim(model, structures[:2], args.fmax, 5)  # warm-up: first calls allocate
    times = {"torch-sim (batched)": [], "ASE (loop)": []}
    for _ in range(args.repeats):
        seconds, ts_largest, calls = relax_torch_sim(model, structures, args.fmax, args.max_steps)
        times["torch-sim (batched)"].append(seconds)
        seconds, ase_largest, ase_steps = relax_ase(calc, structures, args.fmax, args.max_steps)
        times["ASE (loop)"].append(seconds)
    converged = {
        "torch-sim (batched)": sum(f < args.fmax for f in ts_largest),
        "ASE (loop)": sum(f < args.fmax for f in ase_largest),
    }
    print(f"force calls: torch-sim {len(calls)} batched calls, {sum(calls)} system evaluations; ASE {ase_steps}")
    print(f"{'path':<22}{'median s':>10}{'structures/s':>14}{'converged':>11}")
    for path, values in times.items():
        median = statistics.median(values)
        print(f"{path:<22}{median:>10.2f}{args.structures / median:>14.2f}{converged[path]:>8}/{args.structures}")
    speedup = statistics.median(times["ASE (loop)"]) / statistics.median(times["torch-sim (batched)"])
    print(f"batched speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
