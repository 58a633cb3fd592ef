"""What the EMT set builders share: worker processes for the jobs, and splits written as one atomic step.

:func:`default_workers` and :func:`run_jobs` run one EMT job per system or trajectory (results in job
order, so a build does not depend on the number of workers). :func:`splits_written_atomically` writes
every split into a hidden folder beside the destination and moves it into place at the end, so an
interrupted build leaves the old set (or nothing), never a mix; a full disk is one ``DiskFullError``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from matsciml.atomic import disk_full, replace_path
from matsciml.data.formats.store import DatasetWriter


def default_workers() -> int:
    """Up to 4 processes, one per core this process may use (which can be fewer than the machine has)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4)


def run_jobs(function: Callable[[Any], Any], jobs: Iterable[Any], workers: int) -> Iterator[Any]:
    """``function(job)`` for every job, in order; in ``workers`` processes when more than one."""
    if workers <= 1:
        yield from map(function, jobs)
        return
    # spawn, not fork: safe when the caller has started threads (torch, a test runner)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(function, jobs)


@contextlib.contextmanager
def splits_written_atomically(out: Path) -> Iterator[tuple[Path, dict[str, DatasetWriter]]]:
    """``(partial, writers)``: open a :class:`DatasetWriter` per split under ``partial`` and put it in ``writers``.

    On leaving, every writer is closed and ``partial`` replaces ``out``; on an error the writers are
    aborted and ``partial`` removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    writers: dict[str, DatasetWriter] = {}
    try:
        partial.mkdir()
        yield partial, writers
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
