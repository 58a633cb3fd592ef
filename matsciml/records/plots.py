"""Pictures of a run: parity plots and learning curves, as PNG files.

Pure functions over numpy arrays and pandas frames; the Lightning side (collecting predictions,
ranks, when to draw) is :class:`~matsciml.tasks.plots.PlotCallback`. Figures are built with
:class:`matplotlib.figure.Figure` and rendered by Agg, never through ``pyplot``: no display is
needed, and no global figure state leaks between runs or threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from matsciml.atomic import write_file

#: most points drawn per parity panel; the MAE is still over all of them
MAX_POINTS = 20_000
#: PNG text chunk holding the numbers a plot shows (read back with ``PIL.Image.open(path).text``)
METADATA_KEY = "matsciml"


def subsample(size: int, limit: int | None = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Indices of at most ``limit`` of ``size`` points, sorted, the same for the same seed."""
    if limit is None or size <= limit:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=limit, replace=False))


def _parity_panel(axes, predicted: np.ndarray, reference: np.ndarray, mae: float, quantity: str, unit: str) -> None:
    # NaN/inf points (a diverged model) cannot be placed, and would make the axis limits NaN: left out, counted
    finite = np.isfinite(predicted) & np.isfinite(reference)
    if not finite.all():
        axes.text(
            0.03, 0.97, f"{int((~finite).sum()):,} non-finite points not drawn", transform=axes.transAxes, va="top"
        )
        predicted, reference = predicted[finite], reference[finite]
    axes.scatter(
        reference,
        predicted,
        s=6 if predicted.size > 2_000 else 14,
        alpha=0.5,
        linewidths=0,
        color="tab:blue",
        label=f"MAE {mae:.4g} {unit}",
        rasterized=True,
    )
    both = np.concatenate([predicted, reference]) if predicted.size else np.zeros(1)
    low, high = float(both.min()), float(both.max())
    pad = 0.05 * (high - low) or 1.0
    limits = (low - pad, high + pad)
    axes.plot(limits, limits, color="black", linewidth=1, linestyle="--", label="y = x")
    axes.set(
        xlim=limits,
        ylim=limits,
        xlabel=f"reference {quantity} ({unit})",
        ylabel=f"predicted {quantity} ({unit})",
        aspect="equal",
    )
    # lower right: empty when predictions follow y = x (loc="best" is slow, and warns, on 20k points)
    axes.legend(loc="lower right", markerscale=3)
    axes.grid(alpha=0.3)


def parity_figure(
    energy: tuple[np.ndarray, np.ndarray],
    forces: tuple[np.ndarray, np.ndarray] | None = None,
    mae: Mapping[str, float] | None = None,
    title: str | None = None,
    max_points: int | None = MAX_POINTS,
    seed: int = 0,
) -> tuple[Figure, dict[str, float]]:
    """Predicted against reference energies, and force components when given.

    Args:
        energy: ``(predicted, reference)`` energies in eV.
        forces: ``(predicted, reference)`` force components in eV/Å (free atoms only), or ``None``.
        mae: ``energy_mae`` / ``force_mae`` to show instead of computing them from the arrays
            (e.g. over every rank's share when the arrays are a sample).
        title: the figure's title.
        max_points: the most points drawn per panel (a seeded random sample); the MAE uses all.

    Shapes:
        energy: two ``(num_structures,)`` arrays; forces: two arrays of equal shape, e.g. ``(num_free_atoms, 3)``.

    Returns:
        The figure and the MAEs it shows, ``{"energy_mae": ..., ["force_mae": ...]}``; NaN when a
        prediction is NaN. Non-finite points are not drawn; the panel says how many.
    """
    panels = [("energy", "eV", energy)] + ([("force", "eV/Å", forces)] if forces is not None else [])
    figure = Figure(figsize=(5.2 * len(panels), 5.2), layout="constrained")
    shown: dict[str, float] = {}
    for axes, (quantity, unit, (predicted, reference)) in zip(
        figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        predicted, reference = np.ravel(predicted).astype(float), np.ravel(reference).astype(float)
        name = f"{quantity}_mae"
        shown[name] = float(mae[name]) if mae and name in mae else float(np.abs(predicted - reference).mean())
        keep = subsample(predicted.size, max_points, seed)
        _parity_panel(axes, predicted[keep], reference[keep], shown[name], quantity, unit)
        if keep.size < predicted.size:
            axes.set_title(f"{keep.size:,} of {predicted.size:,} points shown", fontsize="small")
    if title:
        figure.suptitle(title)
    return figure, shown


def epoch_table(history: pd.DataFrame) -> pd.DataFrame:
    """A Lightning ``metrics.csv`` as one row per epoch: the last value logged for each metric.

    Train and validation values of an epoch are logged on separate rows; a run continued in its
    folder logs an epoch again, and the later value wins.
    """
    if "epoch" not in history:
        raise ValueError(f"the metric history has no 'epoch' column (columns: {', '.join(history.columns)})")
    rows = history.dropna(subset=["epoch"])
    return rows.groupby("epoch").last().reset_index()  # last() skips NaN per column


def curves_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    ylabel: str,
    title: str | None = None,
    axes=None,
    log: bool | None = None,
) -> Figure:
    """Lines ``label: (epochs, values)`` with the final value in the legend; on ``axes`` if given.

    ``log``: a log y-axis; by default when every value is positive and they span over a decade.
    """
    figure = axes.figure if axes is not None else Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = axes if axes is not None else figure.subplots()
    values = [float(v) for _, ys in curves.values() for v in ys if np.isfinite(v)]
    for label, (epochs, ys) in curves.items():
        epochs, ys = np.asarray(epochs, dtype=float), np.asarray(ys, dtype=float)
        finite = np.isfinite(ys)
        if not finite.any():
            continue
        final = ys[finite][-1]
        axes.plot(epochs[finite], ys[finite], marker="o", markersize=3, label=f"{label}: {final:.4g}")
    if log is None:
        log = bool(values) and min(values) > 0 and max(values) / min(values) > 10
    if log:
        axes.set_yscale("log")
    else:  # plain numbers on the axis, not "1e-5 + 0.1157" when a metric barely moves
        axes.ticklabel_format(axis="y", useOffset=False)
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    if curves:
        heading = "final value" if len(curves) > 1 else None
        if max(len(label) for label in curves) > 16:  # run names: under the axes, where no line runs
            axes.legend(title=heading, loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small")
        else:
            axes.legend(title=heading)
    if title:
        axes.set_title(title)
    return figure


#: learning-curve panels: y label, then (label, metrics.csv column) pairs; columns a run lacks are left out
_LEARNING_PANELS = (
    ("loss (normalised units)", (("train", "train/loss_epoch"), ("val", "val/loss"))),
    ("energy MAE (eV)", (("train", "train/energy_mae_epoch"), ("val", "val/energy_mae"))),
    ("force MAE (eV/Å)", (("train", "train/force_mae_epoch"), ("val", "val/force_mae"))),
)


def learning_curve_figure(history: pd.DataFrame, title: str | None = None) -> tuple[Figure, dict[str, float]]:
    """Train and validation loss and MAEs per epoch from a run's ``metrics.csv``.

    Returns:
        The figure and the final value of each plotted metric (as in the legends).
    """
    epochs = epoch_table(history)
    panels = [
        (
            ylabel,
            {
                label: (epochs["epoch"], epochs[column])
                for label, column in pairs
                if column in epochs and epochs[column].notna().any()
            },
        )
        for ylabel, pairs in _LEARNING_PANELS
    ]
    panels = [(ylabel, curves) for ylabel, curves in panels if curves]
    if not panels:
        raise ValueError(
            "the metric history holds none of " + ", ".join(c for _, pairs in _LEARNING_PANELS for _, c in pairs)
        )
    figure = Figure(figsize=(4.8 * len(panels), 4.2), layout="constrained")
    for axes, (ylabel, curves) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        curves_figure(curves, ylabel, axes=axes)
    if title:
        figure.suptitle(title)
    final = {
        column: float(epochs[column].dropna().iloc[-1])
        for _, pairs in _LEARNING_PANELS
        for _, column in pairs
        if column in epochs and epochs[column].notna().any()
    }
    return figure, final


def save_png(
    figure: Figure, path: str | os.PathLike, numbers: Mapping[str, float] | None = None, dpi: int = 120
) -> Path:
    """Write ``figure`` to ``path`` atomically (a temporary name, then a rename).

    ``numbers`` (e.g. the MAEs in the legend) go into the PNG's ``matsciml`` text chunk as JSON,
    so a reader gets the exact values without parsing pixels.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {METADATA_KEY: json.dumps(dict(numbers), sort_keys=True)} if numbers else {}
    write_file(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi, metadata=metadata))
    return path


def read_numbers(path: str | os.PathLike) -> dict[str, float]:
    """The numbers :func:`save_png` stored in a PNG (``{}`` if none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(METADATA_KEY)
    return json.loads(text) if text else {}


def runs_figure(histories: Mapping[str, pd.DataFrame], metrics: Sequence[str]) -> tuple[Figure, dict[str, float]]:
    """One panel per metric overlaying runs ``name: metrics.csv frame``, final values in the legends.

    Returns:
        The figure and the final values shown, keyed ``"<run name> <metric>"``.
    """
    tables = {name: epoch_table(history) for name, history in histories.items()}
    missing = [m for m in metrics if not any(m in t and t[m].notna().any() for t in tables.values())]
    if missing:
        known = sorted({c for t in tables.values() for c in t.columns if c not in ("epoch", "step")})
        raise ValueError(f"no run logged {', '.join(missing)}; they have: {', '.join(known)}")
    figure = Figure(figsize=(6.4 * len(metrics), 4.6), layout="constrained")
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        curves = {name: (t["epoch"], t[metric]) for name, t in tables.items() if metric in t}
        curves_figure(curves, metric, axes=axes)
    final = {
        f"{name} {metric}": float(t[metric].dropna().iloc[-1])
        for metric in metrics
        for name, t in tables.items()
        if metric in t and t[metric].notna().any()
    }
    return figure, final
