"""Exported model packages: a trained task as weights + JSON that loads with no other file (docs/export.md).

A package (a folder, or a zip) holds ``weights.safetensors`` or ``weights.pt`` (a plain ``{name: tensor}`` state
dict; the normaliser is buffers, so it is inside), ``model.json`` (task class, its init arguments, model spec) and
``card.json`` (the model card). Loading them (:func:`load_model`) and checkpoints is
:mod:`matsciml.artifacts.model_loading`, whose public names are importable from here as well.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from ase.data import chemical_symbols

from matsciml.artifacts.checkpoints import Which, checkpoint_path, is_package
from matsciml.artifacts.model_loading import (
    CARD_FILE,
    FORMAT,
    FORMAT_VERSION,
    MAX_BYTES,
    MODEL_FILE,
    SAFETENSORS_FILE,
    TORCH_FILE,
    UNITS,
    ExportError,
    build_task,
    checkpoint_task,
    checkpoint_task_path,
    load_model,
    model_description,
    read_checkpoint,
    task_class_from_path,
    task_from_checkpoint,
)
from matsciml.atomic import disk_full, replace_path
from matsciml.records import lineage, provenance
from matsciml.tasks.base import AtomisticTask

# the loading names stay importable from here, where they were before model_loading.py
__all__ = [
    "CARD_FILE",
    "ExportError",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_BYTES",
    "MODEL_FILE",
    "SAFETENSORS_FILE",
    "TORCH_FILE",
    "UNITS",
    "build_task",
    "checkpoint_task_path",
    "export_package",
    "load_model",
    "model_card",
    "model_description",
    "package_files",
    "read_checkpoint",
    "task_class_from_path",
    "task_from_checkpoint",
]


def _weights_bytes(state: dict[str, torch.Tensor]) -> tuple[str, bytes]:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import save

        return SAFETENSORS_FILE, save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return TORCH_FILE, buffer.getvalue()


def _training_data(checkpoint_path: Path) -> dict[str, Any]:
    """What the run that wrote the checkpoint trained on, from its step record if there is one."""
    record_path, record, note = lineage.record_beside(checkpoint_path)
    if record is None:
        return {"known": False, "note": note}
    return {
        "known": True,
        "run_id": record["run_id"],
        "record": str(record_path),
        "step": record["step"],
        "status": record["status"],
        "datasets": [i for i in record["inputs"] if i["kind"] == "dataset"],
        "metrics": record["metrics"],
        "code": record["code"],
    }


def model_card(
    task: AtomisticTask, checkpoint: dict[str, Any], checkpoint_path: Path, intended_use: str | None
) -> dict[str, Any]:
    training = _training_data(checkpoint_path)
    outputs = ["energy"] + [name for name in ("forces", "stress") if getattr(task, f"regress_{name}", False)]
    data = ", ".join(sorted({d["path"] for d in training.get("datasets", []) if d["role"].endswith("train_path")}))
    intended_use = intended_use or (  # the default: the training data's domain, and a warning off it
        f"Research use: {task.task.upper()} {' and '.join(outputs)} for structures like its training data "
        f"({data or 'unknown data'}) with atomic numbers {task.species or 'unknown'}. Other elements, "
        "chemistries or geometries are extrapolation; validate predictions before relying on them."
    )
    return {
        "architecture": type(task.model).__name__,
        "model_class": task.model.spec()["class_path"],
        "parameters": task.model.num_parameters(),
        "cutoff": getattr(task.model, "cutoff", None),
        "representation": task.model.representation,
        "elements": task.species,
        "task": task.task,
        "outputs": outputs,
        "units": UNITS,
        "radius_graph": _radius_graph_card(task),
        "normalization": {
            "note": "the energy normaliser (shift, scale, element references) is buffers in the "
            "weights: predictions come out in eV with no other file",
            "shift": float(task.normalizer.shift),
            "scale": float(task.normalizer.scale),
            "element_references": {chemical_symbols[z]: ref for z, ref in task.normalizer.reference_energies().items()},
            "element_references_source": _references_source(task),
        },
        "training_data": training,
        # this checkpoint (generation 0: digest, run id) and the models it was fine-tuned from
        "lineage": lineage.parent_entry(checkpoint_path),
        "intended_use": intended_use,
        "checkpoint": {
            "name": checkpoint_path.name,
            "sha256": provenance.sha256_file(checkpoint_path),
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
        },
        "exported_by": provenance.code_version(),
        "created_at": provenance.now(),
    }


def _radius_graph_card(task: AtomisticTask) -> dict[str, Any] | None:
    """The training graph (cutoff, neighbour cap), which inference reuses; ``None`` if unrecorded."""
    graph = getattr(task, "graph", None)
    if graph is None:
        return None
    capped = graph["max_neighbors"] is not None
    note = (
        "capped: energies and forces jump where neighbours swap rank; load with max_neighbors=None for a "
        "continuous surface"
        if capped
        else "every neighbour within the cutoff: a continuous surface"
    )
    return {**graph, "note": note}


def _references_source(task: AtomisticTask) -> str:
    setting = getattr(task, "element_references", None)
    fine_tuned = getattr(task, "init_from", None) is not None and task.normalizer.reference_energies()
    if fine_tuned and not isinstance(setting, dict):  # tasks/parent_normalizer.py
        if getattr(task, "keep_parent_references", False):
            return "the parent's (init_from); elements it lacked fitted by least squares on the fine-tuning data"
        return "least-squares refit on the fine-tuning data's composition; the parent's for elements absent from it"
    if setting == "fit":
        return "least-squares fit on the training split's composition (eV per atom of each element)"
    return "given" if setting else "none"


def package_files(
    checkpoint_path: Path, intended_use: str | None = None, trusted_modules: Iterable[str] | None = None
) -> dict[str, bytes]:
    """The package's files as bytes; the task is rebuilt from them first, so what is written loads."""
    checkpoint = read_checkpoint(checkpoint_path)
    description = model_description(checkpoint, trusted_modules)
    task = checkpoint_task(checkpoint, checkpoint_path, trusted_modules)
    weights_name, weights = _weights_bytes(task.state_dict())
    card = model_card(task, checkpoint, checkpoint_path, intended_use)
    return {
        weights_name: weights,
        MODEL_FILE: (json.dumps(description, indent=1) + "\n").encode(),
        CARD_FILE: (json.dumps(card, indent=1, ensure_ascii=False) + "\n").encode(),
    }


def export_package(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    as_zip: bool | None = None,
    overwrite: bool = False,
    intended_use: str | None = None,
    command: list[str] | None = None,
    config: dict[str, Any] | None = None,
    trusted_modules: Iterable[str] | None = None,
    which: Which | None = None,
) -> Path:
    """Write the package of ``checkpoint`` to ``out`` atomically, with ``<out>.step.json`` beside it.

    Args:
        checkpoint: a ``.ckpt`` file, or a run folder with ``which`` ``"best"`` or ``"last"`` (default).
        as_zip: write a zip; default: when ``out`` ends in ``.zip``.
        overwrite: replace an existing package at ``out`` (never anything else); the old one stays
            in place until the new one is complete, and is swapped for it in one step
            (:func:`matsciml.atomic.replace_path`).
        trusted_modules: modules besides ``matsciml`` the checkpoint's classes may come from.
    """
    checkpoint, out = checkpoint_path(checkpoint, which), Path(out)
    as_zip = out.suffix == ".zip" if as_zip is None else as_zip
    # checked before the record exists: a refused export must not replace an existing package's record
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not is_package(out):
        raise FileExistsError(f"{out} exists and is not a model package; refusing to replace it")
    record = provenance.dataset_record(out, "export", command or list(sys.argv), config or {})
    record.add_input("checkpoint", checkpoint, kind="checkpoint")
    with provenance.recorded(record):
        files = package_files(checkpoint, intended_use, trusted_modules)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            if as_zip:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name, data in files.items():
                        archive.writestr(name, data)
            else:
                tmp.mkdir()
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
            replace_path(tmp, out)
        except BaseException as err:
            full = disk_full(err, out)  # one line naming the package; the old one is untouched
            if full is not None:
                raise full from err
            raise
        finally:
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if as_zip:
            record.add_output("package", out, kind="model")
        else:
            for name in sorted(files):
                record.add_output(f"package:{name}", out / name, kind="model")
    return out
