"""A table of the final validation metrics next to the trivial baselines, printed after fit."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

#: metric -> (label, unit, baseline metric or None); the baselines predict the training
#: mean energy and zero forces
ROWS = {
    "energy_mae": ("energy MAE", "eV", "energy_mae_baseline"),
    "energy_per_atom_mae": ("energy MAE per atom", "eV/atom", None),
    "force_mae": ("force MAE", "eV/Å", "force_mae_baseline"),
    "force_cosine": ("force cosine", "", None),
    "stress_mae": ("stress MAE", "eV/Å^3", None),
}


def metrics_table(metrics: dict[str, float], stage: str, title: str) -> Table | None:
    """Rows for the ``{stage}/...`` metrics present in ``metrics``; ``None`` if there are none."""
    table = Table(title=title, title_justify="left")
    for column in ("metric", "model", "baseline", "model / baseline"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = 0
    for name, (label, unit, baseline_name) in ROWS.items():
        value = metrics.get(f"{stage}/{name}")
        if value is None:
            continue
        baseline = metrics.get(f"{stage}/{baseline_name}") if baseline_name else None
        ratio = f"{value / baseline:.2f}" if baseline else ""
        table.add_row(
            f"{label} ({unit})" if unit else label, f"{value:.4f}", "" if baseline is None else f"{baseline:.4f}", ratio
        )
        rows += 1
    return table if rows else None


class MetricsReport(pl.Callback):
    """Print metrics beside the mean-energy / zero-force baselines after fit, validate and test."""

    @staticmethod
    def _print(trainer: pl.Trainer, stage: str, title: str) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        table = metrics_table(metrics, stage, title)
        if table is not None:
            Console().print(table)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "val", "validation metrics after training")

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "val", "validation metrics")

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "test", "test metrics")
