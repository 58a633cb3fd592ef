"""Query step records: which runs exist, how they went, how they compare.

A run is a directory holding ``step.json`` (:mod:`matsciml.provenance`). :func:`load` turns any
mix of run directories and folders of runs into a pandas DataFrame, one row per run, with the
columns people filter and group on (``step``, ``status``, ``task``, ``model``, ``seed``,
``commit``, ...) and every final metric as its own column. Metric histories (``metrics.csv``)
are large, so they are read only on demand, by :func:`history`.

The same from the shell: ``matsciml runs list|show|compare``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from matsciml.provenance import RECORD_NAME, load_record

#: columns every row has, in display order (metrics follow)
COLUMNS = ["run", "step", "status", "task", "model", "seed", "started_at", "duration_s", "world_size", "commit",
           "dirty", "run_id", "path"]


def find_runs(paths: Iterable[str | os.PathLike] = ("runs",)) -> list[Path]:
    """Run directories under ``paths`` (each a run directory, a ``step.json`` or a folder of runs)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() and path.name == RECORD_NAME:
            found.append(path.parent)
        elif (path / RECORD_NAME).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob(RECORD_NAME))
        else:
            raise FileNotFoundError(f"{path}: no such run directory")
    return list(dict.fromkeys(p.resolve() for p in found))


def _short(class_path: Any) -> str | None:
    return class_path.rpartition(".")[2] if isinstance(class_path, str) else None


def summarize(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One row: identity, outcome, the main settings, and the final metrics."""
    config = record.get("config") or {}
    task = config.get("model") or {}
    model = (task.get("init_args") or {}).get("model") or {}
    git = (record.get("code") or {}).get("git") or {}
    row = {
        "run": run_dir.name, "step": record["step"], "status": record["status"], "task": _short(task.get("class_path")),
        "model": _short(model.get("class_path")), "seed": config.get("seed_everything"),
        "started_at": record["started_at"], "duration_s": record["duration_s"],
        "world_size": record["environment"].get("world_size"), "commit": (git.get("commit") or "")[:12] or None,
        "dirty": git.get("dirty"), "run_id": record["run_id"], "path": str(run_dir),
    }
    row.update(record["metrics"]["final"])
    return row


def load(paths: Iterable[str | os.PathLike] | str | os.PathLike = ("runs",), where: str | None = None
         ) -> pd.DataFrame:
    """Runs under ``paths`` as a DataFrame, optionally filtered by a pandas query.

    ``where`` is a :meth:`pandas.DataFrame.query` expression over the columns, e.g.
    ``"status == 'COMPLETED' and model == 'EGNN'"``; metric names with a slash need backticks:
    ```` `val/force_mae` < 0.1 ````.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = [summarize(load_record(run), run) for run in find_runs(paths)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=COLUMNS)
    metrics = sorted(c for c in frame.columns if c not in COLUMNS)
    frame = frame[COLUMNS + metrics]
    if where:
        frame = frame.query(where)
    return frame.reset_index(drop=True)


def history(run: str | os.PathLike | pd.Series) -> pd.DataFrame:
    """The run's logged metric history (``metrics.csv``), read now."""
    run_dir = Path(run["path"] if isinstance(run, pd.Series) else run)
    for output in load_record(run_dir)["outputs"]:
        if output["role"] == "metrics_history":
            return pd.read_csv(output["path"])
    raise FileNotFoundError(f"{run_dir}: the record names no metrics history (metrics.csv)")


def compare(frame: pd.DataFrame, group_by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, standard deviation and count of ``metrics`` per group (e.g. over seeds)."""
    missing = [m for m in metrics if m not in frame.columns]
    if missing:
        known = sorted(c for c in frame.columns if c not in COLUMNS)
        raise ValueError(f"no metric {', '.join(missing)} in these runs; they have: {', '.join(known)}")
    grouped = frame.groupby(group_by, dropna=False)[metrics].agg(["mean", "std", "count"])
    grouped.columns = [f"{metric} {stat}" for metric, stat in grouped.columns]
    return grouped.reset_index()


def render(frame: pd.DataFrame, fmt: str = "table") -> str:
    """``frame`` as an aligned text table, CSV or JSON (records)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=1)
    if frame.empty:
        return "(no runs)"
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def with_plus_minus(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """A :func:`compare` table with ``mean ± std (n)`` per metric, for reading."""
    shown = table.drop(columns=[c for m in metrics for c in (f"{m} mean", f"{m} std", f"{m} count")])
    for metric in metrics:
        mean, std, count = table[f"{metric} mean"], table[f"{metric} std"], table[f"{metric} count"]
        shown[metric] = [f"{m:.4g} ± {s:.2g} (n={n})" if n > 1 else f"{m:.4g} (n={n})"
                         for m, s, n in zip(mean, std.fillna(0.0), count, strict=True)]
    return shown
