"""Loading trained models: checkpoints and exported packages to tasks, never running code from the file.

A package (a folder, or a zip; written by :mod:`matsciml.artifacts.export`) holds ``weights.safetensors`` or
``weights.pt`` (a plain ``{name: tensor}`` state dict), ``model.json`` (task class, its init
arguments, model spec) and ``card.json``. Loading takes task and model classes only from matsciml or
modules the caller trusts (:mod:`matsciml.artifacts.trust`, checked before any import), JSON hyper-parameters,
weights-only tensors, every member read with a size cap (a zip is streamed, never read whole), and
builds the model under the budget of its weights (:mod:`matsciml.artifacts.build_budget`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from matsciml.artifacts.build_budget import BudgetExceeded, check_spec_integers, weights_budget
from matsciml.artifacts.checkpoints import CARD_FILE, MODEL_FILE, Which, checkpoint_path
from matsciml.artifacts.trust import UntrustedClassError, is_zip, resolve_class
from matsciml.models.base import AbstractEnergyModel
from matsciml.tasks.base import AtomisticTask

FORMAT, FORMAT_VERSION = "matsciml-model", 1
SAFETENSORS_FILE, TORCH_FILE = "weights.safetensors", "weights.pt"
UNITS = {"positions": "Å", "energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3"}
#: the most bytes a package member may hold (read in chunks and refused past it, whatever the zip claims)
MAX_BYTES = {MODEL_FILE: 16 << 20, CARD_FILE: 16 << 20, SAFETENSORS_FILE: 2 << 30, TORCH_FILE: 2 << 30}


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a package that cannot (or must not) be loaded."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of a matsciml task (from ``matsciml fit`` or a bare Trainer), read weights-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = _weights_only_load(path, f"{path} is not a readable PyTorch checkpoint (weights-only)")
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    spec = hparams.get("model") if isinstance(hparams, dict) else None
    if not (isinstance(spec, dict) and "class_path" in spec and "state_dict" in checkpoint):
        raise ExportError(f"{path} is not a matsciml checkpoint: it has no weights or no hyper_parameters.model spec")
    return checkpoint


def _weights_only_load(source: Any, what: str) -> Any:
    if not is_zip(source):  # torch's reader of its pre-zip format trusts damaged length fields
        raise ExportError(f"{what}: not a zip-format PyTorch file, as torch.save writes")
    try:  # tensors and plain containers only: any other pickled object is refused unread
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file makes torch's reader raise almost any type (IndexError, struct.error...)
        raise ExportError(f"{what}: {_reason(err)}") from err


def _tensor_dict(state: Any, where: str) -> dict[str, torch.Tensor]:
    """``state`` if it is a ``{name: tensor}`` state dict, else an error naming ``where``."""
    if not (
        isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ExportError(f"{where} does not hold a {{name: tensor}} state dict")
    return state


def _reason(err: Exception) -> str:
    """torch's multi-line error as one line (for main()'s one-line errors): the unpickler's complaint if named."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    return " ".join(text.split())[:400] or type(err).__name__


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data, or an error naming the hyper-parameter that is not."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):  # int keys (element_references) become strings; the task accepts both
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ExportError(f"hyper-parameter {where} is a {type(value).__name__}, not plain data; it cannot be exported")


def model_description(checkpoint: dict[str, Any], trusted_modules: Iterable[str] | None = None) -> dict[str, Any]:
    """``model.json``: the task class with its init arguments and the model spec."""
    hparams = checkpoint["hyper_parameters"]
    class_path = checkpoint_task_path(hparams)
    task_class = task_class_from_path(class_path, trusted_modules)
    accepted = set(inspect.signature(task_class.__init__).parameters) - {"self", "model"}
    init_args = {k: _plain(v, k) for k, v in hparams.items() if k in accepted}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": {"class_path": class_path, "init_args": init_args},
        "model": _plain(hparams["model"], "model"),
    }


def checkpoint_task_path(hparams: dict[str, Any]) -> str:
    """The task class of a checkpoint's hyper-parameters: ``_class_path`` where LightningCLI
    (``matsciml fit``) stored it; a bare Trainer's checkpoint has none, and only S2EF takes
    ``regress_forces``."""
    return hparams.get("_class_path") or (
        "matsciml.tasks.S2EFTask" if "regress_forces" in hparams else "matsciml.tasks.IS2RETask"
    )


def task_class_from_path(class_path: str, trusted_modules: Iterable[str] | None = None) -> type[AtomisticTask]:
    """The ``AtomisticTask`` subclass named ``class_path``, from matsciml or a trusted module (see :mod:`.trust`)."""
    return resolve_class(class_path, AtomisticTask, trusted_modules, what="task class")


def build_task(
    description: dict[str, Any],
    trusted_modules: Iterable[str] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    where: str = MODEL_FILE,
) -> AtomisticTask:
    """A task with fresh weights from a ``model.json`` description.

    Args:
        description: the parsed ``model.json`` (or :func:`model_description` of a checkpoint).
        trusted_modules: modules besides ``matsciml`` the task and model classes may come from.
        weights: the state dict that will be loaded into it: the build is refused as soon as the
            model grows past what these could fill (:func:`matsciml.artifacts.build_budget.weights_budget`).
        where: the file the description came from, for errors.

    Raises:
        ExportError: the description is malformed, or its arguments do not build a task.
        UntrustedClassError: a task or model class outside ``matsciml`` and ``trusted_modules``.
    """
    if not isinstance(description, dict) or (description.get("format"), description.get("format_version")) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise ExportError(f"{where} is not a {FORMAT} description of format_version {FORMAT_VERSION}")
    task = description.get("task")
    if not (isinstance(task, dict) and isinstance(task.get("init_args", {}), dict)):
        raise ExportError(f"{where}: 'task' must be {{'class_path': str, 'init_args': dict}}")
    task_class = task_class_from_path(task.get("class_path", ""), trusted_modules)
    budget = weights_budget(weights) if weights is not None else contextlib.nullcontext()
    try:
        model_spec = description.get("model")
        if weights is not None and isinstance(model_spec, dict):  # from_spec refuses other shapes
            check_spec_integers(model_spec.get("init_args", {}), weights, "model")
        with budget:
            model = AbstractEnergyModel.from_spec(description.get("model"), trusted_modules)
            return task_class(model=model, **task.get("init_args", {}))
    except (ExportError, UntrustedClassError):
        raise
    except BudgetExceeded as err:
        raise ExportError(
            f"{where}: the model it describes is larger than its weights: {err}; refused unbuilt"
        ) from None
    # the constructors' own checks (ValueError), arguments a class does not take (TypeError), sizes
    # torch cannot allocate (RuntimeError, MemoryError) or represent (OverflowError)
    except (TypeError, ValueError, RuntimeError, MemoryError, OverflowError) as err:
        raise ExportError(f"{where}: {task_class.__name__} cannot be built: {_reason(err)}") from None


def task_from_checkpoint(
    path: str | os.PathLike, trusted_modules: Iterable[str] | None = None, which: Which | None = None
) -> AtomisticTask:
    """The task of a Lightning checkpoint, built as a package is (no ``load_from_checkpoint``, whose
    jsonargparse instantiator would import the checkpoint's class paths), with its weights.
    ``path`` may be a run folder, with ``which`` ``"best"`` or ``"last"``
    (:func:`matsciml.artifacts.checkpoints.checkpoint_path`)."""
    path = checkpoint_path(path, which)
    return checkpoint_task(read_checkpoint(path), path, trusted_modules)


def checkpoint_task(
    checkpoint: dict[str, Any], path: str | os.PathLike, trusted_modules: Iterable[str] | None
) -> AtomisticTask:
    """The checkpoint's task with its weights (the build bounded by them, :func:`build_task`)."""
    state = _tensor_dict(checkpoint["state_dict"], f"{path}: state_dict")
    description = model_description(checkpoint, trusted_modules)
    task = build_task(description, trusted_modules, weights=state, where=f"{path}: hyper_parameters")
    try:
        task.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}: its weights do not fit its model spec: {_reason(err)}") from err
    return task


def _load_weights(files: dict[str, bytes], where: Path) -> dict[str, torch.Tensor]:
    name = SAFETENSORS_FILE if SAFETENSORS_FILE in files else TORCH_FILE
    data = files[name]
    if name == SAFETENSORS_FILE:
        if importlib.util.find_spec("safetensors") is None:
            raise ExportError(f"the package's weights are {SAFETENSORS_FILE}; install safetensors to read them")
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:  # safetensors raises its own SafetensorError (and others) on a damaged file
            raise ExportError(f"{where}/{name} is not a readable safetensors file: {_reason(err)}") from None
    state = _weights_only_load(io.BytesIO(data), f"{where}/{name} is not a weights-only tensor file")
    return _tensor_dict(state, f"{where}/{name}")


def _read_capped(stream: IO[bytes], name: str, where: Path) -> bytes:
    """``stream``'s bytes, read in chunks and refused past ``MAX_BYTES[name]`` (never one unbounded read)."""
    cap, chunks, size = MAX_BYTES[name], [], 0
    while chunk := stream.read(min(1 << 20, cap + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise ExportError(f"{where}: {name} holds more than {cap} bytes; a package member may not")
    return b"".join(chunks)


def _read_package(path: Path) -> dict[str, bytes]:
    """The package's known files by name (a zip is streamed member by member, never extracted)."""
    names = (MODEL_FILE, CARD_FILE, SAFETENSORS_FILE, TORCH_FILE)
    if not path.exists():
        raise FileNotFoundError(f"model package {path} does not exist")
    elif path.is_dir():
        files = {}
        for n in names:
            if (path / n).is_file():
                with open(path / n, "rb") as stream:
                    files[n] = _read_capped(stream, n, path)
    else:
        try:
            if not zipfile.is_zipfile(path):  # which raises BadZipFile itself for some damaged archives
                raise ExportError(f"{path} is neither a model package folder nor a zip")
            files = _read_zip(path, names)
        except ExportError:
            raise
        # what zipfile raises on a damaged archive: bad headers or CRCs, undecodable names or
        # deflate streams, offsets it cannot seek to, compression methods it lacks, encryption
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            NotImplementedError,
            RuntimeError,
        ) as err:
            raise ExportError(f"{path} is a damaged zip: {_reason(err)}") from None
    for needed in ((MODEL_FILE,), (SAFETENSORS_FILE, TORCH_FILE)):
        if not any(n in files for n in needed):
            raise ExportError(f"model package {path} lacks {' or '.join(needed)}")
    return files


def _read_zip(path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        files = {}
        for n in (n for n in names if n in members):
            if members[n].file_size > MAX_BYTES[n]:  # the declared size; the stream enforces the real one
                raise ExportError(f"{path}: {n} holds {members[n].file_size} bytes, more than {MAX_BYTES[n]}")
            with archive.open(members[n]) as stream:
                files[n] = _read_capped(stream, n, path)
    return files


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", trusted_modules: Iterable[str] | None = None
) -> AtomisticTask:
    """The task of an exported package (folder or zip), in eval mode on ``device``.

    Args:
        path: a package written by ``matsciml export``.
        device: where to put the weights.
        trusted_modules: modules besides ``matsciml`` whose task or model classes may load
            (your own subclasses, e.g. ``["my_models"]``); any other is refused unimported.

    Raises:
        ExportError: missing or oversized files, or weights that are not a plain tensor dict.
        UntrustedClassError: a task or model class outside ``matsciml`` and ``trusted_modules``.
            Nothing from the package is executed.
    """
    path = Path(path)
    files = _read_package(path)
    try:
        description = json.loads(files[MODEL_FILE])
    except ValueError as err:
        raise ExportError(f"{path}/{MODEL_FILE} is not JSON: {err}") from err
    state = _load_weights(files, path)
    task = build_task(description, trusted_modules, weights=state, where=f"{path}/{MODEL_FILE}")
    try:
        task.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing or unexpected keys, wrong shapes
        raise ExportError(f"{path}: the weights do not fit the model in {MODEL_FILE}: {_reason(err)}") from err
    return task.to(device).eval()
