"""Lineage: the model a model was fine-tuned from, by digest and run id, back through its ancestors.

A fine-tuned run (``init_from``) starts from a *parent*: a checkpoint written by ``matsciml fit``
(``<run>/checkpoints/*.ckpt``, whose run's record is ``<run>/step.json``) or a package written by
``matsciml export`` (its ``card.json`` names the run and holds the chain). :func:`parent_entry`
describes a model file as plain data (kind, path, sha256 digest, run id) with its own parent, and that
one's, and so on: the chain that step records (``lineage``), ``matsciml runs show`` and model cards hold.

Only JSON and file bytes are read (a checkpoint is hashed, never unpickled), so nothing in a parent
runs. A generation whose record is missing or unreadable ends the chain with a ``note``, not an error.
Where an ancestor's file is gone or was replaced since its child read it (its digest differs), the
chain keeps what the child's record says it read. The walk stops at :data:`MAX_GENERATIONS` and at a
file met twice (a cycle).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from matsciml.artifacts.checkpoints import CARD_FILE, checkpoint_path, is_package
from matsciml.records.provenance import RECORD_NAME, load_record, sha256_file

#: ancestors followed at most: deeper chains end with a note
MAX_GENERATIONS = 32
#: the package's files (as in matsciml.artifacts.model_loading, not imported here: no torch for reading JSON)
#: a card larger than this is not read (as the package loader refuses it)
CARD_MAX_BYTES = 16 << 20
#: init_report keys (the contract of AtomisticTask.init_report)
REPORT_KEYS = ("loaded", "extended", "new", "dropped")
CHECKPOINT, PACKAGE = "checkpoint", "package"


def directory_digest(path: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over a folder's files: their relative names and each one's sha256, sorted."""
    digest = hashlib.sha256(b"matsciml-directory-v1\n")
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha256_file(file)}\n".encode())
    return "sha256:" + digest.hexdigest()


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The ``card.json`` of a package folder or zip, as JSON (capped at :data:`CARD_MAX_BYTES`).

    Raises:
        OSError, ValueError, zipfile.BadZipFile: no readable card (callers note it).
    """
    path = Path(path)
    if path.is_dir():
        card = path / CARD_FILE
        if card.stat().st_size > CARD_MAX_BYTES:
            raise ValueError(f"{card} holds more than {CARD_MAX_BYTES} bytes")
        return json.loads(card.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(CARD_FILE)  # KeyError: no card
        if info.file_size > CARD_MAX_BYTES:
            raise ValueError(f"{path}: {CARD_FILE} holds more than {CARD_MAX_BYTES} bytes")
        with archive.open(info) as stream:
            return json.loads(stream.read(CARD_MAX_BYTES + 1))


def record_beside(checkpoint: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The step record of the run that wrote ``checkpoint``: ``(record path, record, note)``.

    ``<run>/checkpoints/x.ckpt`` has its run's record at ``<run>/step.json``; elsewhere, or when
    that record is missing or unreadable, the record is ``None`` and the note says why.
    """
    checkpoint = Path(checkpoint).resolve()
    record_path = checkpoint.parent.parent / RECORD_NAME
    if checkpoint.parent.name != "checkpoints":
        return None, None, "not in a run folder (<run>/checkpoints/*.ckpt beside <run>/step.json): run unknown"
    if not record_path.is_file():
        return record_path, None, f"no step record at {record_path}: its run and its parent (if any) are unknown"
    try:
        record = load_record(record_path)
    except (OSError, ValueError) as err:
        return record_path, None, f"step record {record_path} is unreadable ({err}): run and parent unknown"
    if not isinstance(record, dict):
        return record_path, None, f"step record {record_path} is not a JSON object: run and parent unknown"
    return record_path, record, None


def parent_entry(path: str | os.PathLike, max_generations: int = MAX_GENERATIONS) -> dict[str, Any]:
    """A checkpoint or package described as plain data, with its ancestors (``parent``, recursively).

    Used for a run's parent (``init_from``) and for the model an export packages.

    Args:
        path: a ``.ckpt`` file, a run folder (its ``checkpoints/last.ckpt``) or a package (folder or zip)
            written by ``matsciml export``.
        max_generations: ancestors followed at most.

    Returns:
        ``{"kind": "checkpoint" | "package", "path": resolved path, "digest": "sha256:..." | None,
        "run_id": str | None, "record": the step record or card read | None, "note": str | None,
        "parent": an entry like this one | None}``; ``parent`` is ``None`` for a model trained
        from scratch, and also when the record is missing (then ``note`` says so).
    """
    return _entry(Path(path), set(), max_generations)


def _bare(path: Path, kind: str, digest: str | None, note: str | None) -> dict[str, Any]:
    return {"kind": kind, "path": str(path), "digest": digest, "run_id": None, "record": None, "note": note}


def _entry(path: Path, seen: set[tuple[str, str | None]], generations: int) -> dict[str, Any]:
    path = path.resolve()
    if path.is_dir() and not is_package(path):  # a run folder: its checkpoints/last.ckpt, as init_from reads
        try:
            path = checkpoint_path(path).resolve()
        except FileNotFoundError as err:
            return {**_bare(path, CHECKPOINT, None, str(err)), "parent": None}
    if not path.exists():
        kind = CHECKPOINT if path.suffix == ".ckpt" else PACKAGE
        return {**_bare(path, kind, None, f"{path} does not exist"), "parent": None}
    kind = PACKAGE if is_package(path) else CHECKPOINT
    try:
        digest = directory_digest(path) if path.is_dir() else sha256_file(path)
    except OSError as err:  # unreadable here: the entry says so, the caller goes on
        return {**_bare(path, kind, None, f"{path} is unreadable: {err}"), "parent": None}
    if (str(path), digest) in seen:
        return {**_bare(path, kind, digest, "a cycle: this file is already in the chain"), "parent": None}
    seen.add((str(path), digest))
    entry = _bare(path, kind, digest, None)
    recorded_parent: dict[str, Any] | None = None
    if kind == CHECKPOINT:
        record_path, record, entry["note"] = record_beside(path)
        if record is not None:
            entry.update(run_id=_text(record.get("run_id")), record=str(record_path))
            recorded_parent = _recorded_parent(record.get("lineage"))
    else:
        try:
            card = read_card(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            entry["note"] = f"no readable {CARD_FILE} ({type(err).__name__}: {err}): run and parent unknown"
            card = None
        if isinstance(card, dict):
            training = card.get("training_data")
            run_id = _text(training.get("run_id")) if isinstance(training, dict) else None
            entry.update(run_id=run_id, record=f"{path}/{CARD_FILE}")
            own = card.get("lineage")  # the chain of the checkpoint the package was exported from
            if own is None:
                entry["note"] = f"its {CARD_FILE} has no lineage (exported before lineage was recorded)"
            recorded_parent = _recorded_parent(own)
    entry["parent"] = _follow(recorded_parent, entry, seen, generations)
    return entry


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _recorded_parent(lineage: Any) -> dict[str, Any] | None:
    """The parent a record's or card's ``lineage`` names, if it is an entry with a path (else ``None``)."""
    parent = lineage.get("parent") if isinstance(lineage, dict) else None
    return parent if isinstance(parent, dict) and isinstance(parent.get("path"), str) else None


def _follow(
    recorded: dict[str, Any] | None, child: dict[str, Any], seen: set[tuple[str, str | None]], generations: int
) -> dict[str, Any] | None:
    """The parent as found now if its file is still what ``child``'s record read, else as recorded."""
    if recorded is None:
        return None
    if generations <= 0:
        cut = _bare(Path(recorded["path"]), recorded.get("kind", CHECKPOINT), recorded.get("digest"), None)
        cut.update(
            run_id=recorded.get("run_id"), note="chain cut here: its ancestors are not followed (max_generations)"
        )
        return {**cut, "parent": None}
    path = Path(recorded["path"])
    if path.exists():
        found = _entry(path, seen, generations - 1)
        if recorded.get("digest") in (None, found["digest"]):
            return found
        why = f"{path} changed since run {child['run_id']} read it (then {recorded.get('digest')})"
    else:
        why = f"{path} is gone"
    kept = {key: recorded.get(key) for key in ("kind", "path", "digest", "run_id", "record", "parent")}
    kept["note"] = f"{why}: as recorded by run {child['run_id']}"
    return kept


def run_lineage(init_from: str | os.PathLike, report: dict[str, Any] | None) -> dict[str, Any]:
    """The ``lineage`` entry of a run started from ``init_from``: its parent and what was loaded.

    Args:
        init_from: the task's ``init_from`` (a checkpoint or package path, as given).
        report: the task's ``init_report`` (``{"parent", "loaded", "extended", "new", "dropped"}``,
            lists of state-dict names), or ``None`` if the task kept none.
    """
    return {"init_from": str(init_from), "parent": parent_entry(init_from), **run_report(report)}


def run_report(report: dict[str, Any] | None) -> dict[str, Any]:
    """``{"counts": {...}, "names": {...}}`` of an ``init_report`` (zero and empty before it is known)."""
    report = report if isinstance(report, dict) else {}
    names = {key: sorted(map(str, report.get(key) or [])) for key in REPORT_KEYS}
    return {"counts": {key: len(value) for key, value in names.items()}, "names": names}


def chain(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The generations of ``entry``, itself first, each without its ``parent``."""
    generations = []
    while isinstance(entry, dict) and len(generations) <= MAX_GENERATIONS:
        generations.append({k: v for k, v in entry.items() if k != "parent"})
        entry = entry.get("parent")
    return generations


def format_chain(entry: dict[str, Any] | None, first: int = 0) -> list[str]:
    """One line per generation (number, kind, run id, digest prefix, path), notes indented below.

    Args:
        entry: a :func:`parent_entry` (or ``None``: no lines).
        first: the number of the first generation (0: the model itself, 1: a run's parent).
    """
    lines = []
    for number, generation in enumerate(chain(entry), start=first):
        digest = (generation.get("digest") or "-")[:19]
        lines.append(
            f"  {number:>2d} {generation.get('kind', '?'):10s} run {generation.get('run_id') or '?':32s} "
            f"{digest}  {generation.get('path')}"
        )
        if generation.get("note"):
            lines.append(f"     note: {generation['note']}")
    return lines
