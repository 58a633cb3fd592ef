"""Energies and forces for many structures: from Python over Atoms, or file to file with resume.

:func:`predict_atoms` runs a trained task over a list of ``Atoms`` in batches (DataLoader workers
build the graphs) and returns copies carrying the results the way ASE stores them (a
``SinglePointCalculator``: ``get_potential_energy()``, ``get_forces()``; in extxyz, ``energy=``
and a ``forces`` column). :func:`predict_files` does it for any ASE-readable files into one
extxyz file, which grows batch by batch under a ``.partial`` name and is renamed when complete;
killed midway, the same command continues after the last finished batch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from rich.console import Console

from matsciml.atomic import disk_full, write_file
from matsciml.data.progress import progress_bar
from matsciml.data.structures import batch_from_atoms
from matsciml.integrations.calculators import TRAINED, MaxNeighbors, check_species, inference_graph, trained_species
from matsciml.tasks.base import AtomisticTask


def load_any(model: str | os.PathLike, device: str = "cpu") -> AtomisticTask:
    """A task from a Lightning checkpoint (``.ckpt``) or an exported package (folder or zip)."""
    from matsciml.integrations.calculators import load_task

    if Path(model).suffix == ".ckpt":
        return load_task(model, device=device)
    from matsciml.artifacts.export import load_model

    return load_model(model, device=device)


def _batches(
    task: AtomisticTask, structures: Sequence[Atoms], batch_size: int, num_workers: int, max_neighbors: MaxNeighbors
) -> Iterator[list[Atoms]]:
    """Copies of ``structures`` with results, one batch at a time."""
    collate = functools.partial(batch_from_atoms, **inference_graph(task, max_neighbors))
    loader = torch.utils.data.DataLoader(
        list(structures), batch_size=batch_size, num_workers=num_workers, collate_fn=collate
    )
    device = next(task.parameters()).device
    start = 0
    for batch in loader:
        out = task(batch.to(device))  # forces need autograd: the task enables it itself
        energies = out["energy"].detach().cpu().double().numpy()
        forces = out["forces"].detach().cpu().double().numpy() if "forces" in out else None
        results, offset = [], 0
        for i, energy in enumerate(energies):
            atoms = structures[start + i].copy()
            n = len(atoms)
            values = {"energy": float(energy)}
            if forces is not None:
                values["forces"] = forces[offset : offset + n]
            atoms.calc = SinglePointCalculator(atoms, **values)
            results.append(atoms)
            offset += n
        start += len(energies)
        yield results


def predict_atoms(
    task: AtomisticTask,
    structures: Sequence[Atoms],
    batch_size: int = 8,
    num_workers: int = 0,
    max_neighbors: MaxNeighbors = TRAINED,
) -> list[Atoms]:
    """Copies of ``structures`` with the task's energy (eV) and, for S2EF, forces (eV/Å).

    ``max_neighbors``: as for :class:`~matsciml.integrations.calculators.MatSciMLCalculator` (default: the
    graph the task was trained on; a cap warns once per call).
    """
    task = task.eval()
    species = trained_species(task)
    for index, atoms in enumerate(structures):  # all of them first: no batch is predicted for nothing
        check_species(species, atoms, "<structures>", index)
    return [atoms for batch in _batches(task, structures, batch_size, num_workers, max_neighbors) for atoms in batch]


def _progress_file(partial: Path) -> Path:
    return partial.with_name(partial.name + ".done")


def _append(partial: Path, results: list[Atoms], done: dict) -> None:
    """Append one batch; on a full disk cut ``partial`` back to its finished batches (none: remove it) and say so."""
    try:
        with open(partial, "a") as handle:
            write(handle, results, format="extxyz")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        full = disk_full(err, partial)
        if full is None:
            raise
        if done["bytes"] == 0:
            partial.unlink()
        else:
            with open(partial, "r+b") as handle:  # frees the half batch; a rerun continues from here
                handle.truncate(done["bytes"])
        raise full from err


def predict_files(
    task: AtomisticTask,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 8,
    num_workers: int = 0,
    max_neighbors: MaxNeighbors = TRAINED,
    progress: bool = True,
) -> int:
    """Predict every structure of ``inputs`` (any ASE-readable files) into the extxyz file ``out``.

    Returns the number of structures written. Resumable: ``<out>.partial`` holds finished
    batches and ``<out>.partial.done`` how many structures and bytes they are; a rerun cuts the
    file back to that size and continues after them.
    """
    out = Path(out)
    structures: list[Atoms] = []
    species = trained_species(task)
    for path in inputs:
        frames = read(path, index=":")
        for index, atoms in enumerate(frames):  # before any output is written
            check_species(species, atoms, path, index)
        structures += frames
    partial = out.with_name(out.name + ".partial")
    done_file = _progress_file(partial)
    done = {"structures": 0, "bytes": 0}
    if partial.exists() and done_file.exists():
        done = json.loads(done_file.read_text())
        with open(partial, "r+b") as handle:  # drop a batch that was being written when the run stopped
            handle.truncate(done["bytes"])
    else:
        partial.write_bytes(b"")
    task = task.eval()
    bar = progress_bar(Console(stderr=True), unit="structures", disable=not progress)
    with bar:
        counter = bar.add_task(f"predicting into {out.name}", total=len(structures), completed=done["structures"])
        remaining = structures[done["structures"] :]
        for results in _batches(task, remaining, batch_size, num_workers, max_neighbors):
            _append(partial, results, done)
            done = {"structures": done["structures"] + len(results), "bytes": partial.stat().st_size}
            write_file(done_file, json.dumps(done).encode())
            bar.update(counter, completed=done["structures"])
    os.replace(partial, out)
    done_file.unlink()
    return done["structures"]
