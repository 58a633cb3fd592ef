"""Query step records: which runs exist, how they went, how they compare.

A run is a directory holding ``step.json`` (:mod:`matsciml.records.provenance`). :func:`load` turns any
mix of run directories and folders of runs into a pandas DataFrame, one row per run, with the
columns people filter and group on (``step``, ``status``, ``task``, ``model``, ``seed``,
``commit``, ...) and every final metric as its own column. Metric histories (``metrics.csv``)
are large, so they are read only on demand, by :func:`history`.

The same from the shell: ``matsciml runs list|show|compare``.

A record still ``RUNNING`` or ``RESUMED`` whose process is gone shows as ``DIED`` (:func:`status`):
its heartbeat is older than :data:`DIED_AFTER_S`, or, on the host that ran it, its pid is no longer
alive. The record file itself is left as the process left it.
"""

from __future__ import annotations

import ast
import datetime as dt
import operator
import os
import re
import shlex
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from matsciml.records.partials import pid_alive
from matsciml.records.provenance import RECORD_NAME, RESUMED, RUNNING, load_record

#: columns every row has, in display order (metrics follow)
COLUMNS = [
    "run",
    "step",
    "status",
    "task",
    "model",
    "seed",
    "started_at",
    "duration_s",
    "world_size",
    "commit",
    "dirty",
    "run_id",
    "path",
]


#: a running step refreshes its heartbeat every 30 s (matsciml.records.step_recorder.HEARTBEAT_S); one this old means
#: the process is gone (generous: a long validation batch or checkpoint write must not look like death)
DIED_AFTER_S = 600.0
#: shown for a RUNNING/RESUMED record whose process died
DIED = "DIED"


def status(record: dict[str, Any], now: dt.datetime | None = None) -> str:
    """The record's status, ``DIED`` for a RUNNING/RESUMED one whose process is gone.

    Dead: the heartbeat is older than :data:`DIED_AFTER_S`, or the record was written on this host
    and its pid is not alive. Records without a heartbeat (older versions) keep their status.
    """
    beat = record.get("heartbeat")
    if record["status"] not in (RUNNING, RESUMED) or not beat:
        return record["status"]
    age = ((now or dt.datetime.now(dt.UTC)) - dt.datetime.fromisoformat(beat["at"])).total_seconds()
    if age > DIED_AFTER_S or (beat["hostname"] == socket.gethostname() and not pid_alive(int(beat["pid"]))):
        return DIED
    return record["status"]


def find_runs(paths: Iterable[str | os.PathLike] = ("runs",)) -> list[Path]:
    """Record files under ``paths``: run directories, record files, or folders searched recursively.

    Records are ``step.json`` in run directories and ``<dataset>.step.json`` beside datasets.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file() and path.name.endswith(RECORD_NAME):
            found.append(path)
        elif path.is_dir():  # its own record first, then nested ones (an hpo study's trials)
            own = [path / RECORD_NAME] if (path / RECORD_NAME).is_file() else []
            found += own + sorted(p for p in path.rglob(f"*{RECORD_NAME}") if p not in own)
        else:
            raise FileNotFoundError(f"{path}: no such run directory")
    return list(dict.fromkeys(p.resolve() for p in found))


def _run_name(record_file: Path) -> str:
    if record_file.name == RECORD_NAME:
        return record_file.parent.name
    return record_file.name[: -len(RECORD_NAME) - 1]


def _short(class_path: Any) -> str | None:
    return class_path.rpartition(".")[2] if isinstance(class_path, str) else None


def summarize(record: dict[str, Any], record_file: Path) -> dict[str, Any]:
    """One row: identity, outcome, the main settings, and the final metrics."""
    config = record.get("config") or {}
    task = config.get("model") or {}
    model = (task.get("init_args") or {}).get("model") or {}
    git = (record.get("code") or {}).get("git") or {}
    row = {
        "run": _run_name(record_file),
        "step": record["step"],
        "status": status(record),
        "task": _short(task.get("class_path")),
        "model": _short(model.get("class_path")),
        "seed": config.get("seed_everything"),
        "started_at": record["started_at"],
        "duration_s": record["duration_s"],
        "world_size": record["environment"].get("world_size"),
        "commit": (git.get("commit") or "")[:12] or None,
        "dirty": git.get("dirty"),
        "run_id": record["run_id"],
        "path": str(record_file),
    }
    row.update(record["metrics"]["final"])
    return row


def load(paths: Iterable[str | os.PathLike] | str | os.PathLike = ("runs",), where: str | None = None) -> pd.DataFrame:
    """Runs under ``paths`` as a DataFrame, optionally filtered.

    ``where`` is a filter over the columns in pandas-query syntax, e.g.
    ``"status == 'COMPLETED' and model == 'EGNN'"``; metric names with a slash need backticks:
    ```` `val/force_mae` < 0.1 ````. Only comparisons (``== != < <= > >= in not in``), ``and`` /
    ``or`` / ``not`` (or ``& | ~``), column names and literals are accepted (:func:`where_mask`):
    it is parsed and evaluated here, never handed to ``DataFrame.query``, which would resolve
    ``@name`` references and run calls.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = [summarize(load_record(path), path) for path in find_runs(paths)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=COLUMNS)
    metrics = sorted(c for c in frame.columns if c not in COLUMNS)
    frame = frame[COLUMNS + metrics]
    if where:
        frame = frame[where_mask(frame, where)]
    return frame.reset_index(drop=True)


_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def where_mask(frame: pd.DataFrame, where: str) -> pd.Series:
    """The rows of ``frame`` that ``where`` selects, as a boolean Series.

    Raises:
        ValueError: ``where`` is not a filter of comparisons, boolean operators, column names and
            literals, or names a column ``frame`` lacks.
    """
    columns: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:  # `val/energy_mae` is no Python name: stand in for it
        columns[f"_col{len(columns)}_"] = match.group(1)
        return f"_col{len(columns) - 1}_"

    try:
        tree = ast.parse(re.sub(r"`([^`]*)`", placeholder, where).strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"--where {where!r} is not a valid filter: {err.msg}") from None

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Name):
            name = columns.get(node.id, node.id)
            if name not in frame.columns:
                known = ", ".join(map(str, frame.columns))
                raise ValueError(f"--where {where!r}: no column {name!r} (columns: {known})")
            return frame[name]
        try:  # literals: numbers, strings, True/False/None, lists and tuples of them, -1
            return ast.literal_eval(node)
        except ValueError:
            raise ValueError(
                f"--where {where!r}: {ast.unparse(node)!r} is not allowed; use comparisons, "
                "and/or/not, column names and literals only"
            ) from None

    def mask(node: ast.AST) -> pd.Series:
        if isinstance(node, ast.BoolOp):
            parts = [mask(v) for v in node.values]
            combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
            result = parts[0]
            for part in parts[1:]:
                result = combine(result, part)
            return result
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
            return (operator.and_ if isinstance(node.op, ast.BitAnd) else operator.or_)(
                mask(node.left), mask(node.right)
            )
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.Invert):
            return ~mask(node.operand)
        if isinstance(node, ast.Compare):
            result, left = pd.Series(True, index=frame.index), node.left
            for op, right in zip(node.ops, node.comparators, strict=True):
                a, b = value(left), value(right)
                if isinstance(op, ast.In | ast.NotIn):
                    if not isinstance(a, pd.Series) or isinstance(b, pd.Series) or not isinstance(b, list | tuple):
                        raise ValueError(f"--where {where!r}: 'in' needs a column on the left and a list on the right")
                    test = a.isin(list(b))
                    result &= ~test if isinstance(op, ast.NotIn) else test
                elif type(op) in _COMPARE:
                    result &= _COMPARE[type(op)](a, b)
                else:
                    raise ValueError(f"--where {where!r}: the comparison {type(op).__name__} is not allowed")
                left = right
            return result.astype(bool)
        raise ValueError(
            f"--where {where!r}: {ast.unparse(node)!r} is not allowed; use comparisons, "
            "and/or/not, column names and literals only"
        )

    return mask(tree.body)


def history(run: str | os.PathLike | pd.Series) -> pd.DataFrame:
    """The run's logged metric history (``metrics.csv``), read now."""
    path = Path(run["path"] if isinstance(run, pd.Series) else run)
    for output in load_record(path)["outputs"]:
        if output["role"] == "metrics_history":
            return pd.read_csv(output["path"])
    raise FileNotFoundError(f"{path}: the record names no metrics history (metrics.csv)")


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
        shown[metric] = [
            f"{m:.4g} ± {s:.2g} (n={n})" if n > 1 else f"{m:.4g} (n={n})"
            for m, s, n in zip(mean, std.fillna(0.0), count, strict=True)
        ]
    return shown


# -- DVC -----------------------------------------------------------------------------------------
#: steps run by the LightningCLI: their results live in a run folder (checkpoints, metrics.json)
_LIGHTNING_STEPS = ("fit", "validate", "test", "predict")


def _relative(path: str, cwd: Path) -> str:
    path = Path(path)
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _pinned_command(record: dict[str, Any], run_dir: Path, cwd: Path) -> list[str]:
    """The recorded command, told to write into the same run directory again."""
    command = list(record["command"])
    if record["step"] in _LIGHTNING_STEPS:
        pins = {
            "--trainer.logger.init_args.save_dir": _relative(str(run_dir.parent.parent), cwd),
            "--trainer.logger.init_args.name": run_dir.parent.name,
            "--trainer.logger.init_args.version": run_dir.name,
        }
        if record["step"] == "fit":  # a reproduction starts afresh in its folder
            pins["--overwrite"] = "true"
        command = [arg for arg in command if arg.partition("=")[0] not in pins] + [f"{k}={v}" for k, v in pins.items()]
    return command


def dvc_stage(record_file: str | os.PathLike) -> dict[str, Any]:
    """A ``dvc.yaml`` stage (``cmd``, ``deps``, ``params``, ``outs``, ``metrics``) that reproduces a step.

    Paths are relative to the directory the step ran in (the record's ``cwd``), where the
    ``dvc.yaml`` belongs. Datasets and checkpoints the step read are dependencies, so stages chain
    (``data convert`` -> ``fit``); config files given with ``--config`` are parameter files.
    """
    record_file = Path(record_file)
    if record_file.is_dir():
        record_file = record_file / RECORD_NAME
    record = load_record(record_file)
    cwd = Path(record["cwd"])
    command = _pinned_command(record, record_file.parent, cwd)
    configs = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == "--config"]
    deps = [_relative(i["path"], cwd) for i in record["inputs"]]
    stage: dict[str, Any] = {"cmd": shlex.join(command), "deps": list(dict.fromkeys(deps))}
    if configs:
        stage["params"] = [{config: None} for config in configs]  # every key of each config file
    if record["step"] in _LIGHTNING_STEPS:
        run_dir = record_file.parent
        outs = [o for o in record["outputs"] if o["kind"] in ("predictions",)]
        stage["outs"] = ([_relative(str(run_dir / "checkpoints"), cwd)] if record["step"] == "fit" else []) + [
            _relative(o["path"], cwd) for o in outs
        ]
        stage["metrics"] = [{_relative(str(run_dir / "metrics.json"), cwd): {"cache": False}}]
    else:
        stage["outs"] = [_relative(o["path"], cwd) for o in record["outputs"]]
    return stage
