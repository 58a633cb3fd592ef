"""A small S2EF set of slabs of chosen metals (ASE EMT): data with an element the devset lacks, to fine-tune on.

``matsciml devset build --metals Al --structures 60 --out data/al`` calls :func:`build_element_set`. The systems
are the S2EF devset's (:func:`matsciml.data.devset_builder.s2ef_system`: a slab with an H/C/N/O adsorbate,
EMT-relaxed, then Langevin MD; :data:`~matsciml.data.devset_builder.FRAMES_PER_SYSTEM` frames each), with the
slab metal drawn from ``metals`` only, each from its own random stream seeded by ``(seed, sid)``: the same seed
gives identical records and content hashes for any number of workers. The shipped ``devsets/s2ef`` trains on
Cu, Ag, Au, Ni, Pd and Pt slabs (Al appears in its val and test splits only), so an Al set adds one new element.

Structures are split 3:1:1 into ``train``, ``val`` and ``test``, which never share a system. The three
splits are written into a hidden folder beside ``out`` and moved into place together.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console

from matsciml.atomic import disk_full, replace_path
from matsciml.data import emt_systems as emt
from matsciml.data.devset_builder import FRAMES_PER_SYSTEM, s2ef_system
from matsciml.data.devsets import DEVSET_SPLITS
from matsciml.data.formats.store import DatasetWriter
from matsciml.data.progress import progress_bar
from matsciml.data.records import Record


def split_sizes(structures: int) -> dict[str, int]:
    """``structures`` frames split 3:1:1 into train, val and test (val and test at least 1 each).

    Raises:
        ValueError: fewer than 3 structures, or not an integer.
    """
    if isinstance(structures, bool) or not isinstance(structures, int) or structures < 3:
        raise ValueError(f"--structures must be an integer of at least 3 (one per split), got {structures!r}")
    held_out = max(1, round(structures / 5))
    return {"train": structures - 2 * held_out, "val": held_out, "test": held_out}


def check_metals(metals: Sequence[str]) -> tuple[str, ...]:
    """``metals`` as a tuple, each one EMT has parameters for, without repeats.

    Raises:
        ValueError: an empty list, or a symbol outside :data:`~matsciml.data.emt_systems.METALS`.
    """
    metals = tuple(dict.fromkeys(metals))
    unknown = [m for m in metals if m not in emt.METALS]
    if not metals or unknown:
        raise ValueError(
            f"--metals {' '.join(unknown) or '(none)'}: choose one or more of {', '.join(emt.METALS)} "
            "(the fcc metals ASE's EMT has parameters for)"
        )
    return metals


def _jobs(seed: int, sizes: dict[str, int], metals: tuple[str, ...]) -> list[tuple[str, int, int, int, tuple]]:
    """One job per system, in write order; sids run on across splits so splits never share one."""
    jobs, sid = [], 0
    for split in DEVSET_SPLITS:
        remaining = sizes[split]
        while remaining > 0:
            frames = min(FRAMES_PER_SYSTEM, remaining)
            jobs.append((split, seed, sid, frames, metals))
            remaining -= frames
            sid += 1
    return jobs


def _run(job: tuple[str, int, int, int, tuple]) -> list[Record]:
    _, seed, sid, frames, metals = job
    return s2ef_system(seed, sid, frames, metals=metals)


def _results(jobs: list, workers: int) -> Iterator[list[Record]]:
    if workers <= 1:
        yield from map(_run, jobs)
        return
    # spawn, not fork: safe when the caller has started threads (torch, a test runner)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_run, jobs)


def build_element_set(
    out: str | os.PathLike,
    metals: Sequence[str],
    structures: int = 60,
    seed: int = 0,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate ``out/{train,val,test}``: S2EF frames of slabs of ``metals`` with H/C/N/O adsorbates.

    Args:
        out: output folder.
        metals: slab metals, from :data:`~matsciml.data.emt_systems.METALS` (e.g. ``["Al"]``).
        structures: frames in all, split 3:1:1 (:func:`split_sizes`).
        seed: build seed; the same seed gives identical records and content hashes.
        overwrite: replace an existing ``out``.
        workers: worker processes (default: up to 4, one per core); results do not depend on it.
        progress: show a progress bar.

    Returns:
        The frames written per split.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before any work).
        ValueError: unknown metals, or fewer than 3 structures.
    """
    out, metals, sizes = Path(out), check_metals(metals), split_sizes(structures)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite)")
    if workers is None:  # the cores this process may use, which can be fewer than the machine has
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cores, 4)
    jobs = _jobs(seed, sizes, metals)
    source = (
        f"Generated by matsciml.data.element_set (seed {seed}) with ASE EMT: {', '.join(metals)} (111)/(100)/(211) "
        "slabs with H/C/N/O adsorbates; frames from EMT L-BFGS relaxations and 300-800 K Langevin MD; "
        "energy = EMT total energy."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    writers: dict[str, DatasetWriter] = {}
    start = time.perf_counter()
    try:
        partial.mkdir()
        for split in DEVSET_SPLITS:
            writers[split] = DatasetWriter(
                partial / split,
                task="s2ef",
                source=source,
                command=f"matsciml devset build --metals {' '.join(metals)} --structures {structures} --seed {seed}",
                title=f"matsciml EMT set: {'/'.join(metals)} slabs, S2EF {split}",
                license="MIT (generated by matsciml, like its code)",
            )
        with progress_bar(unit="systems", disable=not progress) as bar:
            bar_task = bar.add_task("EMT systems", total=len(jobs))
            for (split, _, sid, _, _), records in zip(jobs, _results(jobs, workers), strict=True):
                for index, record in enumerate(records):
                    writers[split].add(record, f"{split} sid {sid}", index)  # validates
                bar.advance(bar_task)
        for writer in writers.values():
            writer.close()
        replace_path(partial, out)
    except BaseException as err:
        full = disk_full(err, out)  # judged before the partial splits are removed
        for writer in writers.values():
            writer.abort()  # closes open shards; harmless on a closed writer
        shutil.rmtree(partial, ignore_errors=True)
        if full is not None:
            raise full from err
        raise
    if progress:
        Console().print(
            f"built {sum(sizes.values())} {'/'.join(metals)} structures in {out} in {time.perf_counter() - start:.1f} s"
        )
    return sizes
