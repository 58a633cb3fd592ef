"""Milliseconds per force-training step: our equivariant models against nequip 0.19.1, one thread each.

A step is what training does per batch: energies and forces (``-dE/dx`` with ``create_graph``),
MSE on per-atom energy and on forces (1:1, nequip's recipe), backward, Adam. The batch holds 5
rattled EMT-labelled Cu/Pd fcc(111) slabs with 3 O adsorbates (83 atoms, periodic; ~35 neighbours
within 5 Å). Ours and nequip run in separate processes (nequip has its own virtualenv), alternating
round by round, so both see the same machine load. Usage::

    PYTHONPATH=$PWD .venv/bin/python experiments/bench_equivariant_step.py
    ... --model matsciml.models.NequIP --init-args '{"parity": false}' --profile
    ... --model matsciml.models.MACE --nequip-python none        # time another model alone

The model is any ``AbstractEnergyModel`` by class path; ``cutoff`` is set from ``--cutoff`` and, if
the model takes it, ``avg_num_neighbors`` from the batch (as the data module would).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_NEQUIP_PYTHON = "/work/main/.venv-nequip/bin/python"
SYMBOLS = ("Cu", "Pd", "O")


def frames(count: int, seed: int = 0) -> list:
    """``count`` 83-atom slabs, Cu/Pd at random, rattled, with EMT energies and forces."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = fcc111("Cu", size=(4, 4, 5), vacuum=6.0, a=3.7)
        for k, site in enumerate(("fcc", "hcp", "ontop")):
            add_adsorbate(atoms, "O", 1.6, site, offset=(k, k))
        metals = np.flatnonzero(atoms.numbers != 8)
        atoms.numbers[rng.choice(metals, size=len(metals) // 3, replace=False)] = 46  # a third Pd
        atoms.pbc = True
        atoms.rattle(stdev=0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        atoms.info["energy"], atoms.arrays["forces"] = atoms.get_potential_energy(), atoms.get_forces()
        out.append(atoms)
    return out


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def profile_table(step, steps: int = 3) -> None:
    """Where a step's time goes: torch.profiler's operator table, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)


def ours(args) -> dict:
    from matsciml.data.structures import batch_from_atoms

    dtype = getattr(torch, args.dtype)
    atoms = frames(args.batch_size)
    batch = batch_from_atoms(atoms, cutoff=args.cutoff, dtype=dtype)
    module, _, name = args.model.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {"cutoff": args.cutoff, **json.loads(args.init_args)}
    if "avg_num_neighbors" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("avg_num_neighbors", batch.num_edges / batch.num_atoms)
    torch.manual_seed(0)
    model = cls(**kwargs).to(dtype).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    natoms = torch.tensor([len(a) for a in atoms], dtype=dtype)
    energy_target = torch.tensor([a.info["energy"] for a in atoms], dtype=dtype)
    # centred per-atom targets, as the task normalises them: the loss stays O(1)
    energy_target = energy_target - (energy_target / natoms).mean() * natoms
    force_target = torch.as_tensor(np.concatenate([a.arrays["forces"] for a in atoms]), dtype=dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        positions = batch.positions.detach().requires_grad_(True)
        energy = model(batch.replace(positions=positions))
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
        loss = torch.nn.functional.mse_loss(energy / natoms, energy_target / natoms)
        loss = loss + torch.nn.functional.mse_loss(-gradient, force_target)
        loss.backward()
        optimizer.step()

    times = time_steps(step, args.warmup, args.steps)
    result = {
        "engine": args.model,
        "ms": 1e3 * statistics.median(times),
        "params": sum(p.numel() for p in model.parameters()),
        "atoms": batch.num_atoms,
        "neighbors": batch.num_edges / batch.num_atoms,
    }
    if args.profile:
        profile_table(step)
    return result


def nequip(args) -> dict:
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()  # nequip's builders refuse to run before it (seed, default dtype float64)

    dtype = getattr(torch, args.dtype)
    atoms = frames(args.batch_size)
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=list(SYMBOLS))
    data = [mapper(compute_neighborlist_(from_ase(a), r_max=args.cutoff)) for a in atoms]
    data = AtomicDataDict.batched_from_list(data)
    neighbors = AtomicDataDict.num_edges(data) / AtomicDataDict.num_nodes(data)
    model = NequIPGNNModel(
        seed=0,
        model_dtype=args.dtype,
        r_max=args.cutoff,
        type_names=list(SYMBOLS),
        num_layers=3,
        l_max=1,
        parity=True,
        num_features=32,
        radial_mlp_depth=2,
        radial_mlp_width=64,
        num_bessels=8,
        polynomial_cutoff_p=6,
        avg_num_neighbors=neighbors,
        per_type_energy_scales=dict.fromkeys(SYMBOLS, 1.0),
        per_type_energy_shifts=dict.fromkeys(SYMBOLS, 0.0),
    ).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    natoms = torch.tensor([len(a) for a in atoms], dtype=dtype)
    energy_target = torch.tensor([a.info["energy"] for a in atoms], dtype=dtype)
    energy_target = energy_target - (energy_target / natoms).mean() * natoms
    force_target = torch.as_tensor(np.concatenate([a.arrays["forces"] for a in atoms]), dtype=dtype)
    data = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in data.items()}

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(dict(data))
        energy = out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)
        loss = torch.nn.functional.mse_loss(energy / natoms, energy_target / natoms)
        loss = loss + torch.nn.functional.mse_loss(out[AtomicDataDict.FORCE_KEY], force_target)
        loss.backward()
        optimizer.step()

    times = time_steps(step, args.warmup, args.steps)
    params = sum(p.numel() for p in model.parameters())
    if args.profile:
        profile_table(step)
    return {"engine": "nequip 0.19.1", "ms": 1e3 * statistics.median(times), "params": params, "neighbors": neighbors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="matsciml.models.NequIP", help="class path of our model")
    parser.add_argument("--init-args", default="{}", help="JSON init args of our model")
    parser.add_argument("--nequip-python", default=DEFAULT_NEQUIP_PYTHON, help="'none': skip nequip")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/nequip process pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of our step (stderr)")
    parser.add_argument("--engine", choices=["ours", "nequip"], help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine is not None:
        print(json.dumps(ours(args) if args.engine == "ours" else nequip(args)))
        return
    engines = [("ours", sys.executable)]
    if args.nequip_python != "none":
        engines.append(("nequip", args.nequip_python))
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for engine, python in engines:
            command = [python, str(Path(__file__).resolve()), *sys.argv[1:], "--engine", engine]
            if args.profile and round_ > 0:
                command.remove("--profile")
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            results.setdefault(engine, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    for runs in results.values():
        first = runs[0]
        ms = ", ".join(f"{r['ms']:.0f}" for r in runs)
        print(
            f"{first['engine']:32s} {statistics.median(r['ms'] for r in runs):7.0f} ms/step (rounds: {ms})  "
            f"{first['params']:,} parameters, {first['neighbors']:.1f} neighbours/atom"
        )


if __name__ == "__main__":
    main()
