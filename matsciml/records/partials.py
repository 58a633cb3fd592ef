"""Partial outputs of dead processes: found, removed, and their step records closed.

A step that writes a dataset builds it in a hidden folder beside the destination,
``.<name>.partial-<pid>``, and renames it into place at the end. A process killed on the way
(``kill -9``, out of memory, a lost node) leaves that folder behind, and its step record
(``<name>.step.json``) saying ``RUNNING``. The next step writing the same destination removes
the partials whose process is gone (:func:`remove_stale_partials`) and closes such a record as
``INTERRUPTED`` (:func:`close_interrupted_record`). A partial of a live process is left alone.

Process ids are those of this machine: conversions into one destination from several machines
at once are not supported (their final renames would race anyway).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def partial_path(destination: str | os.PathLike, pid: int | None = None) -> Path:
    """The hidden folder beside ``destination`` that process ``pid`` (default: this one) writes into."""
    destination = Path(destination)
    return destination.parent / f".{destination.name}.partial-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:  # Linux: a killed child not yet reaped is a zombie
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def partials(destination: str | os.PathLike) -> dict[int, Path]:
    """Every partial folder of ``destination``, by the pid in its name."""
    destination = Path(destination)
    found = {}
    for path in destination.parent.glob(f".{destination.name}.partial-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit():
            found[int(pid)] = path
    return found


def remove_stale_partials(destination: str | os.PathLike) -> list[int]:
    """Remove the partials of ``destination`` whose process is dead; return those pids."""
    found = partials(destination)
    dead = sorted(pid for pid in found if pid != os.getpid() and not pid_alive(pid))
    for pid in dead:
        if found[pid].is_dir() and not found[pid].is_symlink():
            shutil.rmtree(found[pid], ignore_errors=True)
        else:
            found[pid].unlink(missing_ok=True)
    return dead


def close_interrupted_record(record_path: str | os.PathLike, destination: str | os.PathLike) -> dict[str, Any] | None:
    """Close the record of a step that died writing ``destination``; remove its stale partials.

    The record is closed ``INTERRUPTED`` when it still says ``RUNNING``, a partial of a dead
    process exists and none of a live one (which could be the record's own step).

    Returns:
        What the closed record was (run id, start, the dead pid), for the next record's links;
        ``None`` when nothing was closed.
    """
    from matsciml.records.provenance import INTERRUPTED, RUNNING, now, write_atomically

    found = partials(destination)
    live = [pid for pid in found if pid == os.getpid() or pid_alive(pid)]
    dead = remove_stale_partials(destination)
    record_path = Path(record_path)
    if not dead or live or not record_path.is_file():
        return None
    try:
        data = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not a record we can read: the new step's record replaces it
    if not isinstance(data, dict) or data.get("status") != RUNNING:
        return None
    message = (
        f"process {dead[-1]} died while writing {Path(destination).name} (found by the next step writing it, "
        f"which removed its partial {partial_path(destination, dead[-1]).name})"
    )
    data.update(status=INTERRUPTED, ended_at=now(), error={"type": "ProcessDied", "message": message, "traceback": ""})
    write_atomically(record_path, json.dumps(data, indent=1, default=str) + "\n")
    return {"run_id": data.get("run_id"), "started_at": data.get("started_at"), "pid": dead[-1], "reason": message}
