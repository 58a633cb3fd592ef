"""Step records: what one step of work read, did, wrote and measured, as JSON next to its outputs.

Every CLI step (``fit``, ``validate``, ``test``, ``predict``, ...) keeps one :class:`StepRecord` in
its run directory, ``step.json``, valid against ``schemas/step_record.schema.json``. The record
is written when the step starts (status ``RUNNING``) and rewritten atomically on every change,
so a run that crashes or is killed still says what it was doing; a run that ends says
``COMPLETED``, ``FAILED`` (with the error) or ``INTERRUPTED``. A run continued from a checkpoint
reopens its record (:meth:`StepRecord.reopen`): ``RESUMED`` while it runs, each resume listed. While
a step runs, :meth:`StepRecord.beat` keeps a heartbeat (time, pid, host), from which
:mod:`matsciml.records.runs` tells a record whose process died (``DIED``).

This module knows nothing of models, data formats or Lightning: callers pass paths, digests,
configuration and metrics in plain Python types.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from matsciml.atomic import write_file

SCHEMA_VERSION = 1
RECORD_NAME = "step.json"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "step_record.schema.json"
RUNNING, COMPLETED, FAILED, INTERRUPTED = "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED"
#: a run continued from a checkpoint, running again (it ends COMPLETED, FAILED or INTERRUPTED)
RESUMED = "RESUMED"
#: packages whose versions a record names, when installed
PACKAGES = ("matsciml", "torch", "lightning", "numpy", "jsonargparse", "vesin", "ase", "lmdb", "dgl", "torch_geometric")


class DirtyCheckoutError(RuntimeError):
    """``--require_clean`` was given and the git checkout has uncommitted changes."""


def require_clean_checkout() -> None:
    """Refuse to start from a checkout with uncommitted changes (a record could not name the code)."""
    state = git_state()
    if state is None:
        raise DirtyCheckoutError("--require_clean: matsciml is not running from a git checkout")
    if state["dirty"]:
        raise DirtyCheckoutError(
            f"--require_clean: {state['root']} has uncommitted changes; commit or stash "
            "them so the run's record names the code it ran"
        )


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """``"sha256:<hex>"`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, text.encode("utf-8"))


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding ``path`` (default: this package), else ``None``."""
    root = Path(path) if path is not None else Path(__file__).resolve().parent
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"root": top, "commit": commit, "dirty": bool(status) if status is not None else None}


def code_version() -> dict[str, Any]:
    """The package version, and the git commit when running from a checkout."""
    from matsciml import __version__

    return {"package": "matsciml", "version": __version__, "git": git_state()}


def environment(world_size: int = 1) -> dict[str, Any]:
    """Interpreter, package versions, host, devices and scheduler of this process."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": packages,
        "devices": _devices(),
        "world_size": world_size,
        "slurm": None,
    }
    if "SLURM_JOB_ID" in os.environ:
        env["slurm"] = {
            "job_id": os.environ["SLURM_JOB_ID"],
            "ntasks": _int(os.environ.get("SLURM_NTASKS")),
            "nodes": _int(os.environ.get("SLURM_NNODES")),
            "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        }
    return env


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _devices() -> list[str]:
    torch = sys.modules.get("torch")  # only if the step already uses it: no import cost for data steps
    names = []
    if torch is not None and torch.cuda.is_available():
        names += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if torch is not None and hasattr(torch, "xpu") and torch.xpu.is_available():
        names += [f"xpu:{i} {torch.xpu.get_device_name(i)}" for i in range(torch.xpu.device_count())]
    return names


class StepRecord:
    """The record of one step, kept in ``directory / step.json``.

    Args:
        directory: the step's run directory (created if missing).
        step: the step's name (``"fit"``, ``"data convert"``, ...).
        command: the command line; defaults to ``sys.argv``.
        config: the resolved configuration, as plain data.
        run_id: a stable identity (e.g. ``slurm-<job>``); a random one by default.
        name: the record's file name: ``step.json`` in a run directory; steps that write a
            dataset keep theirs beside it, as ``<dataset>.step.json`` (see :func:`dataset_record`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        step: str,
        command: list[str] | None = None,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
        world_size: int = 1,
        name: str = RECORD_NAME,
    ):
        self.directory, self.name = Path(directory), name
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id or uuid.uuid4().hex,
            "step": step,
            "command": list(sys.argv if command is None else command),
            "cwd": os.getcwd(),
            "status": RUNNING,
            "error": None,
            "started_at": now(),
            "ended_at": None,
            "duration_s": None,
            "config": config or {},
            "inputs": [],
            "outputs": [],
            "metrics": {"final": {}, "best": {}},
            "code": code_version(),
            "environment": environment(world_size),
            "links": {},
        }

    @property
    def path(self) -> Path:
        return self.directory / self.name

    @property
    def status(self) -> str:
        return self.data["status"]

    def save(self) -> None:
        write_atomically(self.path, json.dumps(self.data, indent=1, default=str) + "\n")

    @classmethod
    def reopen(cls, directory: str | os.PathLike, name: str = RECORD_NAME) -> StepRecord:
        """The record already in ``directory``, running again (``RESUMED``; call :meth:`note_resume`)."""
        record = cls.__new__(cls)
        record.directory, record.name = Path(directory), name
        record.data = load_record(record.directory / name)
        record.data.update(status=RESUMED, ended_at=None, duration_s=None)
        record.data.setdefault("resumes", [])
        return record

    def note_resume(
        self, checkpoint: str | os.PathLike | None, step: int, epoch: int, command: list[str] | None = None
    ) -> None:
        """Record that the run continued from ``checkpoint`` at training ``step`` (epoch ``epoch``), by ``command``."""
        previous = self.data.pop("error", None)
        self.data["error"] = None  # the run goes on; the entry keeps what ended the previous start
        self.data.setdefault("resumes", []).append(
            {
                "at": now(),
                "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
                "step": int(step),
                "epoch": int(epoch),
                "command": list(sys.argv if command is None else command),
                "previous_error": None if previous is None else previous["message"],
            }
        )
        self.save()

    def beat(self) -> None:
        """Refresh the heartbeat (now, this pid and host) and save: the process is alive."""
        self.data["heartbeat"] = {"at": now(), "pid": os.getpid(), "hostname": socket.gethostname()}
        self.save()

    def add_input(self, role: str, path: str | os.PathLike, kind: str = "file", digest: str | None = None) -> None:
        """An input; files are hashed (sha256) unless ``digest`` is given (e.g. a dataset's content hash)."""
        path = Path(path)
        if digest is None and path.is_file():
            digest = sha256_file(path)
        self.data["inputs"].append({"role": role, "kind": kind, "path": str(path.resolve()), "digest": digest})

    def add_output(self, role: str, path: str | os.PathLike, kind: str = "file", digest: str | None = None) -> None:
        """An output, hashed now if a file (call once it is complete) unless ``digest`` is given."""
        path = Path(path)
        entry = {"role": role, "kind": kind, "path": str(path.resolve()), "digest": digest, "bytes": None}
        if path.is_file():
            entry.update(digest=digest or sha256_file(path), bytes=path.stat().st_size)
        self.data["outputs"] = [o for o in self.data["outputs"] if o["path"] != entry["path"]] + [entry]

    def set_metrics(self, final: dict[str, float] | None = None, best: dict[str, Any] | None = None) -> None:
        if final is not None:
            self.data["metrics"]["final"] = dict(final)
        if best is not None:
            self.data["metrics"]["best"] = dict(best)

    def finish(self, status: str = COMPLETED, error: BaseException | None = None) -> None:
        """End the step: status, end time, duration and (for failures) the error; then save."""
        if status not in (COMPLETED, FAILED, INTERRUPTED):
            raise ValueError(f"a step ends COMPLETED, FAILED or INTERRUPTED, not {status!r}")
        self.data["status"] = status
        self.data["ended_at"] = now()
        started = dt.datetime.fromisoformat(self.data["started_at"])
        self.data["duration_s"] = (dt.datetime.fromisoformat(self.data["ended_at"]) - started).total_seconds()
        if error is not None:
            self.data["error"] = {
                "type": type(error).__name__,
                "message": str(error),
                "traceback": "".join(traceback.format_exception(error))[-8000:],
            }
        self.save()


def dataset_record(destination: str | os.PathLike, step: str, command: list[str], config: dict[str, Any]) -> StepRecord:
    """The record of a step writing the dataset ``destination``: ``<destination>.step.json`` beside it.

    Beside, not inside: the dataset appears only when complete (an atomic rename), while the
    record must exist from the start; and the dataset's own bytes stay those of its records.
    A record left ``RUNNING`` by a step that died writing ``destination`` is closed ``INTERRUPTED``
    first and named in the new record's ``links["interrupted"]`` (see :mod:`matsciml.records.partials`).
    """
    from matsciml.records.partials import close_interrupted_record

    destination = Path(destination)
    record = StepRecord(
        destination.parent, step, command=command, config=config, name=f"{destination.name}.{RECORD_NAME}"
    )
    if (interrupted := close_interrupted_record(record.path, destination)) is not None:
        record.data["links"]["interrupted"] = interrupted
    return record


@contextmanager
def recorded(record: StepRecord) -> Iterator[StepRecord]:
    """Save ``record`` as RUNNING, then end it COMPLETED, FAILED or INTERRUPTED with the block."""
    record.save()
    try:
        yield record
    except KeyboardInterrupt as err:
        record.finish(INTERRUPTED, err)
        raise
    except BaseException as err:
        record.finish(FAILED, err)
        raise
    record.finish(COMPLETED)


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """A record from its file (``step.json``, ``<dataset>.step.json``) or its run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as file:
        return json.load(file)
