"""Initialise a task's weights from a trained parent: a checkpoint or an exported package (``init_from``).

The configured model is built as usual; the parent's state dict is then read through the loaders of
:mod:`matsciml.artifacts.model_loading` (weights-only, classes only from trusted modules, nothing
from the file executed) and matched by name and shape:

* ``loaded``: same name and shape, copied;
* ``extended``: a tensor indexed by atomic number (declared by its module,
  :mod:`matsciml.models.species_axes`) that has more species here: the parent's slices fill the
  first ones, the rest keep their fresh initialisation;
* ``new``: only in this task (fresh initialisation); ``dropped``: only in the parent.

Any other shape mismatch is a :class:`ValueError` naming the tensor, never a silent skip. The
normaliser's buffers are loaded too, then refitted on the new data (:mod:`.parent_normalizer`).

When: the task loads the parent when its optimiser is first configured in a fit, which Lightning
does after it has restored a checkpoint (``--ckpt_path``). A resumed fine-tune therefore carries its
report in the checkpoint and never reads the parent again; validate, test, predict, exports and
calculators never read it at all, so the parent file may be gone by then.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from matsciml.artifacts.checkpoints import is_package
from matsciml.models.species_axes import SpeciesAxis, species_axes
from matsciml.tasks.parent_normalizer import refit_normalizer

if TYPE_CHECKING:
    from matsciml.tasks.base import AtomisticTask

#: the lists of an init report, in the order they are printed
REPORT_KEYS = ("loaded", "extended", "new", "dropped")
#: the key of a fine-tune's init report in its Lightning checkpoints
CHECKPOINT_KEY = "matsciml_init_report"


def set_settings(
    task: AtomisticTask,
    init_from: Any,
    keep_parent_references: bool,
    pretrained_lr: float | None,
    element_references: Any,
) -> None:
    """Check the fine-tuning settings (errors name the fix) and keep them on ``task``: ``init_from`` as a
    string, and ``init_report = None`` until the parent is loaded (or a checkpoint brings the report)."""
    if init_from is not None and not isinstance(init_from, str | os.PathLike):
        raise TypeError(f"init_from must be the path of a checkpoint or an exported package, got {init_from!r}")
    if pretrained_lr is not None:
        if init_from is None:
            raise ValueError("pretrained_lr sets the learning rate of weights loaded by init_from; set init_from too")
        if isinstance(pretrained_lr, bool) or not isinstance(pretrained_lr, int | float) or not pretrained_lr > 0:
            raise ValueError(f"pretrained_lr must be a positive number, got {pretrained_lr!r}")
    if keep_parent_references and isinstance(element_references, Mapping) and element_references:
        raise ValueError(
            "keep_parent_references keeps the parent's element references, but element_references gives "
            "others; set one of the two"
        )
    task.init_from = None if init_from is None else os.fspath(init_from)
    task.keep_parent_references, task.pretrained_lr = bool(keep_parent_references), pretrained_lr
    task.init_report = None


def read_parent(path: str | os.PathLike) -> AtomisticTask:
    """The parent task, through the safe loaders (trusted classes only: ``MATSCIML_TRUSTED_MODULES``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ExportError: not a readable matsciml checkpoint or package.
        UntrustedClassError: it names a class outside the trusted modules (refused unimported).
    """
    from matsciml.artifacts.model_loading import load_model, task_from_checkpoint  # imports the tasks

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from {path} does not exist (a checkpoint, run folder or exported package)")
    return load_model(path) if is_package(path) else task_from_checkpoint(path)


def _spec_difference(parent: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """How two model specs differ, ``"hidden: 8 -> 16"``, for a shape error's fix."""
    if parent.get("class_path") != model.get("class_path"):
        return f"class {parent.get('class_path')} -> {model.get('class_path')}"
    old, new = parent.get("init_args", {}), model.get("init_args", {})
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    return ", ".join(changed) or "no setting"


def match_weights(
    state: Mapping[str, torch.Tensor],
    parent: Mapping[str, torch.Tensor],
    axes: Mapping[str, SpeciesAxis],
    specs: tuple[Mapping[str, Any], Mapping[str, Any]] = ({}, {}),
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The state dict to load (``state`` with the parent's values filled in) and the report lists.

    Args:
        state: this task's state dict (its fresh initialisation).
        parent: the parent's state dict.
        axes: the species-indexed tensors of this task, by name (:func:`species_axes`).
        specs: the parent's and this model's ``spec()``, to say in an error what changed.

    Raises:
        ValueError: a tensor whose shape differs and that is not a species extension.
    """
    merged, report = dict(state), {key: [] for key in REPORT_KEYS}
    for name, fresh in state.items():
        if name not in parent:
            report["new"].append(name)
            continue
        old = parent[name]
        if old.shape == fresh.shape:
            merged[name] = old.to(fresh.dtype)
            report["loaded"].append(name)
            continue
        try:
            if name not in axes:
                raise ValueError("it is not indexed by species")
            merged[name] = axes[name].extend(fresh, old)
        except ValueError as err:
            raise ValueError(
                f"init_from: {name} has shape {tuple(old.shape)} in the parent but {tuple(fresh.shape)} here, "
                f"and {err}; build the model with the parent's settings (this model differs in "
                f"{_spec_difference(*specs)}), or leave init_from unset to train from scratch"
            ) from None
        report["extended"].append(name)
    report["dropped"] = [name for name in parent if name not in state]
    return merged, report


def summary(report: Mapping[str, Any]) -> str:
    """One line: the counts, and the names of what was not simply loaded."""
    counts = ", ".join(f"{len(report[key])} {key}" for key in REPORT_KEYS)
    listed = "; ".join(
        f"{key}: {', '.join(report[key][:6])}{' ...' if len(report[key]) > 6 else ''}"
        for key in REPORT_KEYS[1:]
        if report[key]
    )
    return f"matsciml: initialised from {report['parent']}: {counts}" + (f" ({listed})" if listed else "")


def training_statistics(task: AtomisticTask) -> Mapping[str, Any] | None:
    """The new training split's statistics: given to the task (the CLI links them), else its data module's."""
    given = task.hparams.get("statistics")
    datamodule = getattr(task.trainer, "datamodule", None) if task._trainer is not None else None
    return given or getattr(datamodule, "target_statistics", None)


def initialise_from_parent(task: AtomisticTask) -> dict[str, Any]:
    """Load ``task.init_from`` into ``task`` (its normaliser refit on :func:`training_statistics`) and set
    ``task.init_report``, also printed and returned. A fit calls it as it configures the optimiser; call it
    yourself to use the initialised task before (or without) a fit."""
    statistics = training_statistics(task)
    parent = read_parent(task.init_from)
    merged, lists = match_weights(
        task.state_dict(), parent.state_dict(), species_axes(task), (parent.model.spec(), task.model.spec())
    )
    task.load_state_dict(merged, strict=True)
    # the elements the fine-tune predicts: the parent's and the new data's (the calculator accepts these)
    species = sorted({*(parent.species or ()), *(task.species or ())}) or None
    task.species = task.hparams["species"] = species
    task._check_species()
    normaliser = refit_normalizer(task, parent.species, statistics)
    report = task.init_report = {"parent": str(task.init_from), **lists}
    rank_zero_info(summary(report))
    rank_zero_info(f"matsciml: fine-tune normaliser: {normaliser}")
    return report


def parameter_groups(task: AtomisticTask) -> list[dict[str, Any]]:
    """Adam's parameter groups: one at ``lr``, or with ``pretrained_lr`` the loaded and extended
    parameters at it and the new ones at ``lr`` (both groups always, so a resumed optimiser matches)."""
    if task.pretrained_lr is None or task.init_report is None:
        return [{"params": list(task.parameters()), "lr": task.lr}]
    pretrained = set(task.init_report["loaded"]) | set(task.init_report["extended"])
    named = list(task.named_parameters())
    return [
        {"params": [p for n, p in named if n in pretrained], "lr": float(task.pretrained_lr), "name": "pretrained"},
        {"params": [p for n, p in named if n not in pretrained], "lr": task.lr, "name": "new"},
    ]


def save_report(task: AtomisticTask, checkpoint: dict[str, Any]) -> None:
    """Keep the init report (and so the parameter groups) in a fine-tune's checkpoints."""
    if task.init_report is not None:
        checkpoint[CHECKPOINT_KEY] = task.init_report


def restore_report(task: AtomisticTask, checkpoint: Mapping[str, Any]) -> None:
    """Take the report of a resumed fine-tune: the parent is not read again. Its species (the parent's and
    the first data's) stay, whatever the data module of the resumed run links."""
    report = checkpoint.get(CHECKPOINT_KEY)
    if report is None:
        return
    task.init_report = report
    saved = (checkpoint.get("hyper_parameters") or {}).get("species")
    if saved:
        task.species = task.hparams["species"] = sorted({*saved, *(task.species or ())})
