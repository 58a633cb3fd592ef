"""Which errors the command line reports as one ``matsciml: error:`` line, and how.

An error caused by input (a dataset, a config value, a checkpoint, a package, a full disk) is
the user's to fix: :func:`report` prints one line naming the file and record, exit status 2. Any
other exception is a bug and keeps its traceback (exit status 1). ``--debug`` anywhere on the
command line, or ``MATSCIML_DEBUG=1``, prints the traceback of an input error too.

The input errors are listed once, in :data:`INPUT_ERRORS`, by module and name: a type whose
module was never imported cannot have been raised, so matching one imports nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from matsciml.atomic import DiskFullError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MATSCIML_DEBUG"
ERRORS_ENV = "MATSCIML_ERROR_FILE"

#: (module, class name) of every error caused by input, on every subcommand.
INPUT_ERRORS: tuple[tuple[str, str], ...] = (
    ("matsciml.data.errors", "DataError"),  # a dataset file or record (names both)
    ("matsciml.artifacts.model_loading", "ExportError"),  # a checkpoint or package refused or corrupt
    ("matsciml.artifacts.trust", "UntrustedClassError"),  # a checkpoint / package naming untrusted or pickled code
    ("matsciml.trainer.accelerators", "AcceleratorUnavailable"),
    ("matsciml.records.provenance", "DirtyCheckoutError"),
    ("matsciml.hpo", "HPOError"),
    ("matsciml.hpo.space", "SpaceError"),
    ("matsciml.atomic", "DiskFullError"),
    ("matsciml.tasks.divergence", "TrainingDiverged"),  # a setting to change (lr, data, skip_nonfinite_batches)
    ("matsciml.cli.errors", "ConfigError"),
    ("argparse", "ArgumentError"),  # LightningCLI's parser (jsonargparse) refusing a key or value
    ("builtins", "FileNotFoundError"),  # a missing checkpoint, config, dataset or input file
    ("builtins", "FileExistsError"),  # an output that is there already (--overwrite)
    ("builtins", "IsADirectoryError"),
    ("builtins", "NotADirectoryError"),
    ("builtins", "PermissionError"),
)

#: The plain (argparse) subcommands check their arguments with ValueError: input errors there too.
ARGUMENT_ERRORS: tuple[tuple[str, str], ...] = (("builtins", "ValueError"),)

# torch re-raises an error of a DataLoader worker as "Caught X in DataLoader worker process N.\n
# Original Traceback ..." (as a RuntimeError when X cannot be built from that text, as DataError cannot)
_WORKER = re.compile(r"^Caught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class ConfigError(ValueError):
    """A config value the task, model or data module refused while being built from the config."""


def _types(names: Sequence[tuple[str, str]]) -> tuple[type, ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def one_line(text: str) -> str:
    """``text`` with its lines joined, for a one-line error."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _worker_original(err: BaseException) -> tuple[type | None, str] | None:
    """The type (if this process knows it) and message of the error a DataLoader worker raised."""
    match = _WORKER.match(str(err))
    if match is None:
        return None
    name = match["name"]
    # the wrapped traceback ends with "package.module.Name: message" ("Name: message" for builtins)
    last = re.compile(rf"^(?:(?P<module>[\w.]+)\.)?{name}: (?P<message>.*)$", re.MULTILINE)
    found = list(last.finditer(str(err)))
    if not found:
        return None
    module = sys.modules.get(found[-1]["module"] or "builtins")
    cls = getattr(module, name, None)
    return (cls if isinstance(cls, type) else None), found[-1]["message"]


def input_error(err: BaseException, extra: Sequence[tuple[str, str]] = ()) -> str | None:
    """The one-line message for ``err`` if input caused it (it or an error it was raised from), else None.

    The outermost input error of the chain wins: wrappers that are not input errors (jsonargparse's
    "Call to compute_fn of link ... failed", a DataLoader worker's re-raise) are passed through, and
    an input error raised from another one adds context to it (a dataset naming the file and record
    of a structure its transform refused).
    """
    kinds = _types(INPUT_ERRORS) + _types(extra)
    chain, seen, current = [], set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    for link in chain:
        original = _worker_original(link)
        if original is not None:
            cls, message = original
            if cls is not None and issubclass(cls, kinds):
                return one_line(message)
        elif isinstance(link, kinds):
            return one_line(str(link) or type(link).__name__)
    # a full disk under a writer that does not name it (Lightning's logs and plots, torch.save's RuntimeError)
    for link in chain:
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return one_line(str(DiskFullError(link.filename)) if link.filename else f"no space left on device: {link}")
    return None


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def debug_flag(argv: Sequence[str]) -> Iterator[list[str]]:
    """``argv`` without ``--debug``; while the command runs, a given flag is ``MATSCIML_DEBUG=1``.

    The environment reaches the processes Lightning's DDP launcher starts (they re-run the
    command line, from which the flag is gone), and the previous value comes back afterwards.
    """
    rest = [arg for arg in argv if arg != DEBUG_FLAG]
    previous = os.environ.get(DEBUG_ENV)
    if len(rest) != len(argv):
        os.environ[DEBUG_ENV] = "1"
    try:
        yield rest
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """A file where the processes of one job (the DDP ranks this one starts) note their input errors.

    When one rank stops on bad input, the others fail next in a collective ("Connection closed
    by peer"): :func:`report` finds the note and exits 2 without a second line or a traceback.
    """
    if os.environ.get(ERRORS_ENV):  # a rank started by the launcher: the launcher's file
        yield
        return
    handle, path = tempfile.mkstemp(prefix="matsciml-errors-", suffix=".txt")
    os.close(handle)
    os.environ[ERRORS_ENV] = path
    try:
        yield
    finally:
        os.environ.pop(ERRORS_ENV, None)
        Path(path).unlink(missing_ok=True)


def _note(message: str) -> None:
    path = os.environ.get(ERRORS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:  # one short append per process
            handle.write(f"{os.getpid()}\t{message}\n")


def _peer_stopped_on_input() -> bool:
    path = os.environ.get(ERRORS_ENV)
    if not path or not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return any(line.partition("\t")[0] != str(os.getpid()) for line in handle if line.strip())


def report(err: BaseException, extra: Sequence[tuple[str, str]] = ()) -> int:
    """Print ``err`` as one ``matsciml: error:`` line and return 2, or re-raise it if it is a bug.

    A process whose error followed another rank's input error (noted by :func:`job_errors`)
    returns 2 quietly: that rank has printed the line.
    """
    if isinstance(err, KeyboardInterrupt):
        print("matsciml: interrupted", file=sys.stderr)
        return 130
    message = input_error(err, extra)
    if message is None and not _peer_stopped_on_input():
        raise err
    if debug_requested():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if message is not None:
        _note(message)
        print(f"matsciml: error: {message}", file=sys.stderr)
    return 2
