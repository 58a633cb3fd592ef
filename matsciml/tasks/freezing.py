"""Freezing a task's parameters by name pattern, optionally released after some epochs, correct under DDP.

``AtomisticTask(freeze=["model.embedding.*"], unfreeze_after_epochs=N)``: the patterns are
:func:`fnmatch.fnmatchcase` patterns over the task's ``named_parameters()`` names (``*`` also
matches dots). Frozen parameters stay bitwise unchanged; with ``unfreeze_after_epochs`` they train
from epoch ``N`` on (epochs ``0 .. N-1`` frozen).

Lightning's :class:`~lightning.pytorch.callbacks.BaseFinetuning` releases parameters by flipping
``requires_grad`` and adding them to the optimiser. Under DDP that is wrong: the
``DistributedDataParallel`` wrapper registers for gradient averaging only the parameters that require
gradients when the model is wrapped (``_build_params_for_reducer``); a parameter switched on later gets
a gradient from its own rank's batches only, and the ranks' copies silently drift apart. So the two
cases take two mechanisms, each correct under DDP:

- frozen for the whole run (no ``unfreeze_after_epochs``): ``requires_grad=False`` in the callback's
  ``setup``, before the strategy wraps the model. Autograd computes no gradient for them, DDP never
  registers them (no unused-parameter error) and Adam, seeing no gradient, never touches them.
  ``requires_grad`` is restored when fitting ends.
- released later: they keep ``requires_grad=True``, so DDP registers and averages them like any
  other, and while frozen their (averaged) gradients are dropped after each backward pass
  (``grad = None``). Optimisers skip a parameter without a gradient: no update, no weight decay, no
  Adam state. Their gradients are computed while frozen; that is the price of averaging them
  correctly once released. Dropped before ``on_before_optimizer_step``, so gradient clipping and the
  divergence guard see only the gradients that will be applied.

Both states follow from the configuration and ``trainer.current_epoch`` alone, so a run resumed with
``--ckpt_path`` (which restores the epoch) freezes or releases exactly as the uninterrupted run would.
The EMA of the weights (:mod:`matsciml.tasks.ema`) keeps frozen values bitwise: ``ema + (w - ema) * c``
adds an exact zero when ``w == ema``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["ParameterFreezing", "check_freeze", "freezing_callbacks", "matching_names"]


def freezing_callbacks(freeze: Sequence[str] | None, unfreeze_after_epochs: int | None) -> list[pl.Callback]:
    """``[ParameterFreezing(...)]`` for a task's checked settings, ``[]`` when nothing is frozen."""
    return [] if not freeze else [ParameterFreezing(freeze, unfreeze_after_epochs)]


def check_freeze(
    freeze: Sequence[str] | None, unfreeze_after_epochs: int | None, names: Iterable[str] | None = None
) -> tuple[list[str] | None, int | None]:
    """The task's ``freeze`` and ``unfreeze_after_epochs`` settings, checked against its parameter names.

    Args:
        freeze: fnmatch patterns over ``named_parameters()`` names, or ``None`` (nothing frozen).
        unfreeze_after_epochs: the epoch from which frozen parameters train, ``>= 1``, or ``None`` (never).
        names: the task's parameter names, each pattern must match one of; ``None``: not checked yet.

    Returns:
        ``(patterns, unfreeze_after_epochs)``, ``(None, None)`` when nothing is frozen.
    """
    if unfreeze_after_epochs is not None:
        if isinstance(unfreeze_after_epochs, bool) or not isinstance(unfreeze_after_epochs, int):
            raise TypeError(f"unfreeze_after_epochs must be an integer number of epochs, got {unfreeze_after_epochs!r}")
        if unfreeze_after_epochs < 1:
            raise ValueError(
                f"unfreeze_after_epochs must be >= 1 (the first epoch that trains the frozen parameters), "
                f"got {unfreeze_after_epochs}; to freeze nothing, leave freeze unset"
            )
    if freeze is None or (not isinstance(freeze, str) and len(freeze) == 0):
        if unfreeze_after_epochs is not None:
            raise ValueError("unfreeze_after_epochs is set but freeze is not: name the parameters to freeze")
        return None, None
    if isinstance(freeze, str) or not all(isinstance(p, str) for p in freeze):
        raise TypeError(f"freeze must be a list of name patterns, e.g. ['model.embedding.*'], got {freeze!r}")
    patterns = list(freeze)
    if names is None:
        return patterns, unfreeze_after_epochs
    names = list(names)
    frozen = matching_names(patterns, names)
    if unfreeze_after_epochs is None and len(frozen) == len(names):
        raise ValueError(f"freeze {patterns} matches every parameter of the task: nothing would train")
    return patterns, unfreeze_after_epochs


def matching_names(patterns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The names matching any of ``patterns``, in ``names``' order; a pattern matching none is a ValueError."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(_no_match(pattern, names))
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def _no_match(pattern: str, names: Sequence[str]) -> str:
    """The error for a pattern matching no parameter: the closest names or modules, and the task's main modules."""
    modules = {}  # every module holding parameters, at every depth, as a pattern: model.layers.0.*
    for name in names:
        parts = name.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            modules.setdefault(".".join(parts[:depth]) + ".*", depth)
    close = difflib.get_close_matches(pattern, [*modules, *names], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    main = [module for module, depth in modules.items() if depth == 2] or list(modules)
    return (
        f"freeze pattern {pattern!r} matches no parameter of the task{hint} Patterns are fnmatch patterns over "
        f"the task's named_parameters() names, which start with its modules: {', '.join(main)}"
    )


class ParameterFreezing(pl.Callback):
    """Freeze the task's parameters matching ``patterns`` while fitting, until epoch ``unfreeze_after_epochs``.

    ``AtomisticTask(freeze=..., unfreeze_after_epochs=...)`` adds it (``configure_callbacks``).

    Args:
        patterns: fnmatch patterns over the task's ``named_parameters()`` names.
        unfreeze_after_epochs: the first epoch in which they train; ``None``: frozen for the whole run.
    """

    def __init__(self, patterns: Sequence[str], unfreeze_after_epochs: int | None = None):
        checked, self.unfreeze_after_epochs = check_freeze(patterns, unfreeze_after_epochs)
        if checked is None:
            raise ValueError("ParameterFreezing needs at least one pattern")
        self.patterns = checked
        self._frozen: list[torch.nn.Parameter] = []  # the matching parameters, while fitting
        self._switched_off: list[torch.nn.Parameter] = []  # those given requires_grad=False (frozen for the run)

    def frozen_at(self, epoch: int) -> bool:
        """Whether the matching parameters are frozen during ``epoch``."""
        return self.unfreeze_after_epochs is None or epoch < self.unfreeze_after_epochs

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # by name now, not at __init__: parameters are the ones the strategy is about to wrap
        parameters = dict(pl_module.named_parameters())
        names = matching_names(self.patterns, list(parameters))
        self._frozen = [parameters[name] for name in names]
        if self.unfreeze_after_epochs is None:
            self._switched_off = [p for p in self._frozen if p.requires_grad]
            for parameter in self._switched_off:
                parameter.requires_grad_(False)  # before DDP wraps the model: it never registers them
        values = sum(p.numel() for p in self._frozen)
        total = sum(p.numel() for p in parameters.values())
        until = (
            "for the whole run (no gradients)"
            if self.unfreeze_after_epochs is None
            else f"until epoch {self.unfreeze_after_epochs} (gradients dropped before each optimiser step)"
        )
        rank_zero_info(
            f"matsciml: freezing {len(names)} of {len(parameters)} parameter tensors ({values:,} of {total:,} "
            f"values) matching {self.patterns} {until}"
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unfreeze_after_epochs is not None and trainer.current_epoch == self.unfreeze_after_epochs:
            rank_zero_info(f"matsciml: epoch {trainer.current_epoch}: the parameters matching {self.patterns} train")

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after backward returns, DDP has averaged the gradients: dropping them keeps every rank alike
        if self.unfreeze_after_epochs is not None and self.frozen_at(trainer.current_epoch):
            for parameter in self._frozen:
                parameter.grad = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for parameter in self._switched_off:  # freezing is a training setting, not a property of the weights
            parameter.requires_grad_(True)
        self._frozen, self._switched_off = [], []
