"""The divergence guard: a non-finite loss or gradient stops training at that step, before it is applied.

:class:`DivergenceGuard` is on for every ``matsciml fit`` (``divergence_guard:`` in a config). Each
training step it checks the loss and the gradients once the backward pass is done and before the
optimiser uses them: NaN or inf, or (without gradient clipping) a gradient whose square overflows,
which would turn Adam's second moment inf and freeze that parameter while the loss stays finite.
A bad step raises :class:`TrainingDiverged`, one line naming the epoch, the step, the batch's
structures and the last finite loss; the weights, the EMA average and the optimiser state are still
those of the last good step, no checkpoint is written after it (Lightning saves none on an
exception), and the step record ends ``FAILED`` with the line. With ``skip_nonfinite_batches: N``
up to ``N`` such batches are dropped instead (no optimiser step for them), counted in the metric
``train/skipped_nonfinite_batches``, which the step record keeps among its final metrics.

Independently, a checkpoint whose weights or optimiser state hold NaN/inf is refused before it is
written (:meth:`DivergenceGuard.on_save_checkpoint`), so ``last.ckpt`` and ``best.ckpt`` keep the last
finite state whatever made the weights non-finite.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

#: the metric counting skipped batches (logged when ``skip_nonfinite_batches`` > 0)
SKIPPED_METRIC = "train/skipped_nonfinite_batches"
#: structures named per message; a larger batch is summarised by its count
_MAX_IDS = 8


class TrainingDiverged(RuntimeError):
    """A training step gave a non-finite loss or gradient, or a checkpoint would hold non-finite values."""


def structure_ids(batch: Any) -> str:
    """``"sid/fid"`` of each structure in ``batch`` (as the batch carries them), e.g. ``"12/0, 12/3"``."""
    fields = [key for key in ("sid", "fid") if _has(batch, key)]
    if not fields:
        return "(the batch carries no sid/fid)"
    columns = [torch.as_tensor(batch[key]).reshape(-1).tolist() for key in fields]
    ids = ["/".join(str(v) for v in row) for row in zip(*columns, strict=True)]
    shown = ", ".join(ids[:_MAX_IDS]) + (f", ... ({len(ids)} in all)" if len(ids) > _MAX_IDS else "")
    return f"{'/'.join(fields)} {shown}"


def _has(batch: Any, key: str) -> bool:
    try:
        return key in batch
    except TypeError:  # e.g. a DGL graph: its ids are in the matsciml batch the task builds from it
        return False


def _float_tensors(tree: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every floating-point tensor in nested dicts/lists (a checkpoint)."""
    stack = [("", tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                yield path, node
        elif isinstance(node, Mapping):
            stack.extend((f"{path}.{key}" if path else str(key), value) for key, value in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((f"{path}[{i}]", value) for i, value in enumerate(node))


def first_nonfinite(tree: Any) -> str | None:
    """The path of the first tensor in ``tree`` holding NaN or inf, or ``None`` if all are finite."""
    tensors = list(_float_tensors(tree))
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in tensors])  # at checkpoints only
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0])][0]


def _all_finite(tensors: list[torch.Tensor], device: torch.device, squared: bool = False) -> torch.Tensor:
    """A 0-d bool tensor on ``device``: every value (or its square) of every tensor is finite (no host sync).

    One ``isfinite`` over the concatenation: a transient copy the size of the tensors, half the time
    of one check per tensor for the ~40 parameter tensors of a small model.
    """
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    return torch.isfinite(flat.square_() if squared else flat).all()  # NaN and inf stay so when squared


class DivergenceGuard(pl.Callback):
    """Stop (or skip) a training step whose loss or gradients are not finite, before the optimiser applies it.

    The check lives in ``on_before_optimizer_step``: Lightning calls it inside the optimiser's closure
    after ``training_step`` and ``backward`` and before ``optimizer.step()`` (and before gradient
    clipping), so it sees this step's gradients while the weights are untouched. The loss comes from
    ``on_before_backward`` of the same step (with gradient accumulation, every accumulated batch's).
    Under DDP the gradients are already averaged over ranks, and the decision is reduced over ranks
    (two numbers per step), so every rank stops or skips together; a rank alone raising would leave
    the others waiting in the next collective.

    With fp16 mixed precision (a ``GradScaler``), inf gradients are routine: the scaler skips those
    steps and lowers its scale. Only the loss is checked then (and reported times the scale).

    Args:
        skip_nonfinite_batches: how many bad batches to drop (their gradients are cleared, so the
            optimiser leaves weights and state alone) before the next one stops the run. 0 (default):
            the first one stops it.
    """

    def __init__(self, skip_nonfinite_batches: int = 0):
        if isinstance(skip_nonfinite_batches, bool) or not isinstance(skip_nonfinite_batches, int):
            raise TypeError(f"skip_nonfinite_batches must be an integer, got {skip_nonfinite_batches!r}")
        if skip_nonfinite_batches < 0:
            raise ValueError(f"skip_nonfinite_batches must be >= 0, got {skip_nonfinite_batches}")
        self.skip_nonfinite_batches = skip_nonfinite_batches
        #: what each skipped batch was: epoch, step, structures, loss
        self.skipped: list[dict[str, Any]] = []
        self._batches: list[Any] = []  # the batches since the last optimiser step
        self._losses: list[torch.Tensor] = []
        self._last_finite: tuple[int, torch.Tensor] | None = None  # (step, loss), read only when reporting

    # -- collecting the step -----------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args) -> None:
        self._batches.append(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Lightning passes the loss divided by accumulate_grad_batches (and, under fp16, times the scaler's scale)
        self._losses.append(loss.detach() * trainer.accumulate_grad_batches)

    # -- deciding ------------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        batches, losses = self._batches, self._losses
        self._batches, self._losses = [], []
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16: the GradScaler handles inf
        grads = [] if scaled else [p.grad for p in params if p.grad is not None]
        device = pl_module.device
        # squared, in the gradients' dtype: Adam keeps a running mean of g^2 in it (zeros_like(param)); a finite
        # gradient beyond ~1.8e19 in float32 makes it inf, and that parameter never moves again (m / sqrt(inf) = 0)
        # while the loss stays finite. Not when Lightning clips gradients (after this hook): clipping bounds them
        squared = not trainer.gradient_clip_val
        local = torch.stack([~_all_finite(losses, device), ~_all_finite(grads, device, squared)]).float()
        # how many ranks saw a bad loss / bad gradients: every rank takes the same decision
        everywhere = trainer.strategy.reduce(local.clone(), reduce_op="sum") if trainer.world_size > 1 else local
        loss_bad, _, ranks_loss_bad, ranks_grad_bad = torch.cat([local, everywhere]).tolist()  # one host sync
        if not (ranks_loss_bad or ranks_grad_bad):
            if losses:
                self._last_finite = (trainer.global_step, losses[-1])
            return
        where = self._describe(trainer, batches, losses, bool(loss_bad), int(ranks_loss_bad))
        if len(self.skipped) >= self.skip_nonfinite_batches:
            skipped = f" after skipping {len(self.skipped)} batches (skip_nonfinite_batches)" if self.skipped else ""
            raise TrainingDiverged(
                f"training diverged at {where}{skipped}. The step was not applied; lower the learning rate "
                "(model.init_args.lr), or to step over rare bad batches set divergence_guard.skip_nonfinite_batches"
            )
        for p in params:  # optimisers leave parameters without a gradient (and their state) alone
            p.grad = None
        loss = next((float(x) for x in losses if not torch.isfinite(x).all()), None)
        structures = "; ".join(structure_ids(b) for b in batches)
        self.skipped.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "structures": structures, "loss": loss}
        )
        count = f"{len(self.skipped)} of {self.skip_nonfinite_batches}"
        rank_zero_info(f"matsciml: skipped non-finite batch {count} at {where}")

    def _describe(
        self, trainer: pl.Trainer, batches: list[Any], losses: list[torch.Tensor], loss_bad: bool, ranks_loss_bad: int
    ) -> str:
        """``"epoch E, step S: <what> on structures <ids>; last finite loss L at step S'"``."""
        if loss_bad:
            values = ", ".join(f"{float(x):g}" for x in losses if not torch.isfinite(x).all())
            what = f"non-finite loss ({values})"
        elif ranks_loss_bad:
            what = f"non-finite loss on {ranks_loss_bad} other rank(s)"
        else:
            what = "non-finite gradients, or gradients whose square overflows (finite loss)"
        structures = "; ".join(structure_ids(b) for b in batches) or "(no batch)"
        rank = f"; rank {trainer.global_rank} had" if trainer.world_size > 1 else " on"
        structures = f"{rank} structures {structures}"
        if self._last_finite is None:
            last = "no finite loss before it"
        else:
            step, value = self._last_finite
            last = f"last finite loss {float(value):.6g} at step {step}"
        return f"epoch {trainer.current_epoch}, step {trainer.global_step}: {what}{structures}; {last}"

    # -- reporting -----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self.skip_nonfinite_batches:
            # the same count on every rank (the decision is reduced); max keeps it a count at the epoch's end
            pl_module.log(
                SKIPPED_METRIC,
                float(len(self.skipped)),
                on_step=False,
                on_epoch=True,
                reduce_fx="max",
                batch_size=1,
                sync_dist=True,
            )

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # called before the file is written (Trainer.save_checkpoint dumps, then the strategy writes), and
        # ModelCheckpoint removes an older file only after the new one is written: raising keeps it
        for key in ("state_dict", "current_model_state", "optimizer_states"):  # current_model_state: EMA's raw
            where = first_nonfinite(checkpoint.get(key))
            if where is not None:
                raise TrainingDiverged(
                    f"training diverged by epoch {trainer.current_epoch}, step {trainer.global_step}: {key} {where} "
                    "holds NaN or inf, so this checkpoint is not written (those already written are kept); lower "
                    "the learning rate (model.init_args.lr)"
                )

    def state_dict(self) -> dict[str, Any]:
        # empty unless something was skipped: Lightning then stores nothing, and a Trainer without the
        # guard loads the checkpoint without a warning about a missing callback
        return {"skipped": list(self.skipped)} if self.skipped else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict.get("skipped", []))
