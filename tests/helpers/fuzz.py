"""Fuzz targets: every loader that reads a file a user may have been handed, with valid seed inputs.

The contract each target checks (tests/fuzz, experiments/fuzz.py): for any input bytes the loader
either succeeds or raises one of :data:`PROJECT_ERRORS`, within :data:`TIME_LIMIT` seconds. Any other
exception, or a hang, is a finding. Seeds are written by the project's own writers (or, for OC20, as
OCP pickled them) and mutated with :mod:`helpers.mutations`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from matsciml.artifacts.export import ExportError
from matsciml.artifacts.trust import UntrustedClassError
from matsciml.data.errors import DataError

#: What a loader may raise on bad input: the project's own, user-facing error types.
PROJECT_ERRORS: tuple[type[Exception], ...] = (DataError, ExportError, UntrustedClassError)
#: Seconds one input may take before it counts as a hang (a loaded 2-core machine included).
TIME_LIMIT = 20.0


class FuzzTimeout(BaseException):
    """One input ran past :data:`TIME_LIMIT`: a finding. Not an ``Exception``, so a loader's
    ``except Exception`` cannot turn it into one of its own errors."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`FuzzTimeout` in the main thread once ``seconds`` have passed."""

    def expire(signum, frame):
        raise FuzzTimeout(f"input still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Target:
    """A loader under test.

    Args:
        name: the ``--target`` name.
        seeds: valid inputs (built once, cached).
        load: feeds one input (bytes) to the loader; may write files under the given folder.
    """

    name: str
    seeds: Callable[[], list[bytes]]
    load: Callable[[bytes, Path], object]


def run(target: Target, data: bytes, workdir: Path) -> Exception | None:
    """Feed ``data`` to ``target``: ``None`` if it loaded, else the project error it raised.

    Raises:
        Exception: anything outside :data:`PROJECT_ERRORS` (a finding), also a ``MemoryError`` that a
            project error was raised from (loaders wrap what a parser raises, and that hid it).
        FuzzTimeout: the input took longer than :data:`TIME_LIMIT`.
    """
    with warnings.catch_warnings(), time_limit(TIME_LIMIT):
        warnings.simplefilter("ignore")  # a warning on bad input is allowed; it must not turn into an error
        try:
            target.load(data, workdir)
        except PROJECT_ERRORS as err:
            cause = err.__cause__ or err.__context__  # kept by `raise ... from None` too
            while cause is not None and not isinstance(cause, MemoryError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise MemoryError(f"{type(err).__name__} hides a MemoryError: {err}") from cause
            return err
    return None


# -- OC20 pickles ------------------------------------------------------------------------------


@functools.cache
def _oc20_seeds() -> list[bytes]:
    from helpers.oc20 import is2re_record, pickle_record, s2ef_record

    seeds = []
    for style in ("pyg2", "pyg1", "munch"):
        for protocol in (2, 5):
            seeds.append(pickle_record(s2ef_record(natoms=3, seed=1), style, protocol))
    seeds.append(pickle_record(is2re_record(natoms=2), "pyg2", 0))  # protocol 0: bytes via _codecs.encode
    return seeds


def _load_oc20(data: bytes, workdir: Path) -> object:
    from matsciml.data.formats import oc20
    from matsciml.data.records import validate_record

    return validate_record(oc20.decode(data, "fuzz.lmdb", 0), "fuzz.lmdb", 0)


# -- matsciml's record codec --------------------------------------------------------------------


def reseal(value: bytes) -> bytes:
    """``value`` with its integrity fields made valid again, so mutations reach the layer beneath them.

    A record of codec version >= 2 ends in a CRC-32 of every byte before it: recompute it over the
    mutated bytes. Values too short for a prefix, of another magic or of version 1 stay as they are.
    """
    import struct
    import zlib

    from matsciml.data.formats import store

    if len(value) < 10 or value[:4] != store.MAGIC:
        return value
    (version,) = struct.unpack_from("<H", value, 4)
    if version < store.CHECKSUM_VERSION:
        return value
    body = value[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@functools.cache
def _store_seeds() -> list[bytes]:
    from helpers.structures import slab_record
    from matsciml.data import keys as K
    from matsciml.data.formats import store
    from matsciml.data.records import validate_record

    records = [
        validate_record(slab_record(seed, sid=seed, task=task), "seed", seed)
        for seed, task in enumerate(K.TASK_TARGETS)
    ]
    stored = [{name: record[name] for name in K.STORED if name in record} for record in records]
    return [store.encode(record) for record in stored]


def _load_store(data: bytes, workdir: Path) -> object:
    from matsciml.data.formats import store
    from matsciml.data.records import check_stored_record

    return check_stored_record(store.decode(data, "fuzz.lmdb", 0), "fuzz.lmdb", 0, task=None)


def _load_store_payload(data: bytes, workdir: Path) -> object:
    return _load_store(reseal(data), workdir)


# -- extxyz ------------------------------------------------------------------------------------------


@functools.cache
def _extxyz_seeds() -> list[bytes]:
    import ase.io

    from helpers.ase_inputs import emt_frames

    seeds = []
    for frames in (emt_frames(2), emt_frames(1, seed=3)):
        text = io.StringIO()
        ase.io.write(text, frames, format="extxyz")
        seeds.append(text.getvalue().encode())
    return seeds


def _load_extxyz(data: bytes, workdir: Path) -> object:
    from matsciml.data.formats import ase_io

    path = workdir / "frames.xyz"
    path.write_bytes(data)
    return [ase_io.read_unit(unit, "s2ef") for unit in ase_io.plan_units(path, "s2ef")]


# -- model packages and checkpoints ---------------------------------------------------------------


@functools.cache
def _model_files() -> dict[str, bytes]:
    """A tiny S2EF task as a checkpoint (``model.ckpt``) and as package files (weights.pt, model.json)."""
    import torch

    from helpers.training import tiny_egnn
    from matsciml.artifacts.export import package_files
    from matsciml.tasks import S2EFTask

    task = S2EFTask(model=tiny_egnn(), species=[1, 8, 29])
    checkpoint = {
        "epoch": 0,
        "global_step": 0,
        "state_dict": task.state_dict(),
        "hyper_parameters": {**task.hparams, "_class_path": "matsciml.tasks.S2EFTask"},
    }
    with tempfile.TemporaryDirectory(prefix="fuzz-seed-") as folder:
        path = Path(folder) / "model.ckpt"
        torch.save(checkpoint, path)
        return {"model.ckpt": path.read_bytes(), **package_files(path)}


def _zip(files: dict[str, bytes], compression: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _package(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name != "model.ckpt"}


def _load_package_folder(workdir: Path, files: dict[str, bytes]) -> object:
    from matsciml.artifacts.export import load_model

    folder = workdir / "package"
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return load_model(folder)


def _load_package_zip(data: bytes, workdir: Path) -> object:
    from matsciml.artifacts.export import load_model

    path = workdir / "model.zip"
    path.write_bytes(data)
    return load_model(path)


def _load_checkpoint(data: bytes, workdir: Path) -> object:
    from matsciml.artifacts.trust import check_checkpoint_classes
    from matsciml.integrations.calculators import load_task

    path = workdir / "model.ckpt"
    path.write_bytes(data)
    check_checkpoint_classes(path)  # what `matsciml fit --ckpt_path` reads first
    return load_task(path)  # what the calculator, predict-structures and export read


def _member(name: str) -> Callable[[bytes, Path], object]:
    """Load a folder package whose ``name`` member is the input and the others are valid."""
    return lambda data, workdir: _load_package_folder(workdir, {**_package(_model_files()), name: data})


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("oc20", _oc20_seeds, _load_oc20),
        Target("store", _store_seeds, _load_store),
        Target("store-payload", _store_seeds, _load_store_payload),
        Target("extxyz", _extxyz_seeds, _load_extxyz),
        Target(
            "package-zip",
            lambda: [_zip(_package(_model_files()), c) for c in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)],
            _load_package_zip,
        ),
        Target("package-json", lambda: [_model_files()["model.json"]], _member("model.json")),
        Target("package-weights", lambda: [_model_files()["weights.pt"]], _member("weights.pt")),
        Target("checkpoint", lambda: [_model_files()["model.ckpt"]], _load_checkpoint),
    )
}
