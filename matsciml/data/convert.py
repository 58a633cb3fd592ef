"""``matsciml data convert``: ASE / pymatgen inputs to a matsciml LMDB dataset.

Inputs are split into work units (:mod:`matsciml.data.formats.ase_io`) that reader processes
turn into validated records; the main process writes them in input order through
:class:`~matsciml.data.formats.store.DatasetWriter`, so the output (and its content hash) is
the same for any number of workers, and an interrupted or failed run leaves nothing behind.
"""

from __future__ import annotations

import multiprocessing
import shlex
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from os import PathLike
from pathlib import Path

import numpy as np
from rich.console import Console

from matsciml.data import keys as K
from matsciml.data.errors import DataError
from matsciml.data.formats import ase_io
from matsciml.data.formats.store import DatasetWriter
from matsciml.data.min_distance import (
    DEFAULT_MIN_DISTANCE,
    check_min_distance,
    check_min_distance_setting,
    min_distance_calculator,
)
from matsciml.data.progress import progress_bar
from matsciml.data.records import Record

#: Records per shard when none is given: OC20's S2EF shards; IS2RE keeps one data.lmdb.
DEFAULT_RECORDS_PER_SHARD: dict[str, int | None] = {"s2ef": 10_000, "is2re": None}


def convert(
    sources: Sequence[str | PathLike],
    destination: str | PathLike,
    task: str,
    records_per_shard: int | None = None,
    num_workers: int = 1,
    overwrite: bool = False,
    title: str | None = None,
    license: str = "unspecified",
    min_distance: float = DEFAULT_MIN_DISTANCE,
) -> dict:
    """Convert extxyz / ASE trajectory / ASE database / pymatgen files into a matsciml dataset.

    Records keep input order: sources as given, folders in sorted file order, frames in file
    order. ``sid`` is ``atoms.info["sid"]`` when it is an integer, else the record's position in
    the output; ``fid`` is ``atoms.info["fid"]``, else the frame's position in its file. See
    :mod:`matsciml.data.formats.ase_io` for where every field and target is read from.

    Args:
        sources: input files or folders.
        destination: dataset directory to create (written atomically).
        task: ``"s2ef"`` or ``"is2re"``; every record must carry the task's targets.
        records_per_shard: records per ``data.NNNN.lmdb``; ``0`` for a single ``data.lmdb``;
            ``None`` for the task's default (10,000 for S2EF, one ``data.lmdb`` for IS2RE).
        num_workers: reader processes; 0 or 1 reads in this process.
        overwrite: replace an existing dataset at ``destination``.
        title: dataset title for the metadata card (default: the destination's name).
        license: the data's license for the card (e.g. ``CC-BY-4.0``, the OC20 license).
        min_distance: refuse a structure with two atoms closer than this, in Å, periodic images
            included (``0``: no check); the rule loading applies (:mod:`matsciml.data.min_distance`).

    Returns:
        The dataset card written to every shard's metadata.

    Raises:
        DataError: an input is missing, of an unknown type, empty, or holds a bad record
            (atoms closer than ``min_distance`` included).
        FileExistsError: ``destination`` exists and ``overwrite`` is false.
    """
    if task not in K.TASK_TARGETS:
        raise ValueError(f"task must be one of {sorted(K.TASK_TARGETS)}, got {task!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    min_distance = check_min_distance_setting(min_distance)
    if isinstance(sources, str | PathLike):  # one path, not a sequence of characters
        sources = [sources]
    destination = Path(destination)
    if destination.exists() and not overwrite:  # before scanning inputs, which can take a while
        raise FileExistsError(f"{destination} already exists; pass overwrite=True to replace it")
    if not sources:
        raise DataError(destination, "no input files given")
    _refuse_overlap(sources, destination)

    units, described = [], []
    for source in sources:
        found = ase_io.plan_units(source, task)
        units.extend(found)
        described.append(_describe(source, found))
    total = sum(unit.num_records for unit in units)
    if records_per_shard is not None and records_per_shard < 0:
        raise ValueError(f"records_per_shard must be >= 0, got {records_per_shard}")
    shard_size = DEFAULT_RECORDS_PER_SHARD[task] if records_per_shard is None else records_per_shard or None

    writer = DatasetWriter(
        destination,
        task=task,
        records_per_shard=shard_size,
        source="; ".join(described),
        command=shlex.join(sys.argv),
        title=title,
        overwrite=overwrite,
        license=license,
    )
    progress = progress_bar(Console(stderr=True), unit="records")
    try:
        with progress, closing(_read_in_order(units, task, num_workers, min_distance)) as results:
            bar = progress.add_task(f"converting to {destination.name}", total=total)
            written = 0
            for records in results:
                for record in records:
                    if K.SID not in record:
                        record[K.SID] = np.asarray(written, dtype=np.int64)  # running index over all inputs
                    writer.add(record)
                    written += 1
                progress.advance(bar, len(records))
        return writer.close()
    except BaseException as err:  # Ctrl-C included: drop the partial dataset (a full disk: DiskFullError)
        writer.fail(err)
        raise


def _read_in_order(
    units: list[ase_io.WorkUnit], task: str, num_workers: int, min_distance: float
) -> Iterator[list[Record]]:
    """Yield each unit's records in unit order, reading ahead in up to ``num_workers`` processes."""
    if num_workers <= 1 or len(units) == 1:
        for unit in units:
            yield _read_unit(unit, task, min_distance)
        return
    # spawn: workers start clean (no inherited LMDB handles or threads) on every platform
    pool = multiprocessing.get_context("spawn").Pool(min(num_workers, len(units)), initializer=_ignore_sigint)
    try:
        pending: deque = deque()
        remaining = iter(units)
        for unit in remaining:  # a bounded read-ahead keeps memory flat when writing is slower
            pending.append(pool.apply_async(_read_unit, (unit, task, min_distance)))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            records = pending.popleft().get()
            unit = next(remaining, None)
            if unit is not None:
                pending.append(pool.apply_async(_read_unit, (unit, task, min_distance)))
            yield records
    finally:
        pool.terminate()  # stop readers at once on an error or Ctrl-C
        pool.join()


def _read_unit(unit: ase_io.WorkUnit, task: str, min_distance: float) -> list[Record]:
    """A unit's validated records, each also checked for atoms closer than ``min_distance``."""
    records = ase_io.read_unit(unit, task)
    calculator = min_distance_calculator(min_distance) if min_distance > 0 else None
    for frame, record in enumerate(records, unit.start):
        try:
            check_min_distance(record[K.POSITIONS], record[K.CELL], record[K.PBC], min_distance, calculator)
        except ValueError as err:
            raise DataError(unit.path, str(err), frame) from None
    return records


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; only the main process handles it (and cleans up).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _refuse_overlap(sources: Sequence[str | PathLike], destination: Path) -> None:
    """``overwrite`` deletes ``destination``: it must not hold (or be) an input."""
    target = destination.resolve()
    for source in sources:
        resolved = Path(source).resolve()
        if resolved == target or target in resolved.parents:
            raise DataError(source, f"input lies inside the destination {destination}; choose another one")


def _describe(source: str | PathLike, units: list[ase_io.WorkUnit]) -> str:
    kinds = Counter(unit.kind for unit in units)
    files = len({unit.path for unit in units})
    what = f"{files} files, " if Path(source).is_dir() else ""
    return f"{source} ({what}{sum(u.num_records for u in units)} records; {', '.join(sorted(kinds))})"
