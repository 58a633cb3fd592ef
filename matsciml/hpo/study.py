"""Run a search and keep its step record (step ``hpo``) in the study directory.

The study's ``step.json`` names the base config and space file (with sha256), the backend and
trial budget, the study's storage as output, the best value as its metric and, under
``links``, the best trial: number, parameters and run directory. Each trial keeps its own
record under ``<study-dir>/trials/``, so ``matsciml runs list <study-dir>`` shows both.

Several workers on one study each rewrite the study's record when they end; the last one to
finish leaves the complete picture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matsciml.hpo.space import SearchSpace, load_space
from matsciml.records.provenance import StepRecord, recorded

BACKENDS = ("optuna", "sigopt")


def default_study_dir(name: str) -> Path:
    return Path("runs") / "hpo" / name


def run_hpo(
    config: str | os.PathLike,
    space_file: str | os.PathLike,
    trials: int,
    backend: str = "optuna",
    study_dir: str | os.PathLike | None = None,
    study_name: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run trials of ``matsciml fit --config config`` until the study holds ``trials``; returns the summary.

    Args:
        config: the base ``fit`` config (relative paths in it are read from the working directory).
        space_file: the search space (:mod:`matsciml.hpo.space`).
        trials: the number of trials the study should hold when this call returns (finished, or
            still running in other workers).
        backend: ``optuna`` (SQLite in the study directory) or ``sigopt``.
        study_dir: where the study lives (default ``runs/hpo/<study name>``).
        study_name: default: the space file's name without ``.yaml``.
        command: the command line, for the record.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    space = load_space(space_file)  # before anything is written: a bad file leaves no study behind
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such config file")
    name = study_name or Path(space_file).stem
    study_dir = Path(study_dir) if study_dir is not None else default_study_dir(name)
    connection = None
    if backend == "sigopt":
        from matsciml.hpo import sigopt_backend

        connection = sigopt_backend.connect()  # missing library or token: fail before the record exists

    record = StepRecord(
        study_dir,
        "hpo",
        command=command,
        config={
            "config": str(config.resolve()),
            "space_file": str(Path(space_file).resolve()),
            "space": space.content,
            "backend": backend,
            "trials": trials,
            "study_name": name,
            "study_dir": str(study_dir.resolve()),
        },
    )
    record.add_input("config", config, kind="config")
    record.add_input("space", space_file, kind="config")
    with recorded(record):
        if backend == "optuna":
            from matsciml.hpo.optuna_backend import optimize

            summary = optimize(space, config, study_dir, name, trials)
        else:
            summary = sigopt_backend.optimize(space, config, study_dir, name, trials, connection)
        _fill(record, space, summary)
    print(render(summary, space))
    return summary


def _fill(record: StepRecord, space: SearchSpace, summary: dict[str, Any]) -> None:
    best, counts = summary["best"], summary["counts"]
    record.add_output("study", summary["storage"].removeprefix("sqlite:///"), kind="file")
    final = {
        space.metric: best["value"] if best else None,
        "trials_complete": counts.get("complete", 0),
        "trials_pruned": counts.get("pruned", 0),
        "trials_failed": counts.get("fail", 0),
    }
    record.set_metrics(
        final=final,
        best={space.metric: {"value": best["value"], "trial": best["number"], "run_dir": best["run_dir"]}}
        if best
        else {},
    )
    record.data["links"][summary["backend"]] = {
        "study": summary["study"],
        "storage": summary["storage"],
        "metric": space.metric,
        "direction": space.direction,
        "best_trial": best,
    }


def render(summary: dict[str, Any], space: SearchSpace) -> str:
    """A few lines for the terminal: trial counts, the best value, its parameters and run folder."""
    counts = summary["counts"]
    done = {k: counts.get(k, 0) for k in ("complete", "pruned", "fail", "running")}
    lines = [
        f"hpo study {summary['study']} ({summary['backend']}, {summary['storage']}): "
        f"{done['complete']} complete, {done['pruned']} pruned, {done['fail']} failed"
        + (f", {done['running']} running in other workers" if done["running"] else "")
    ]
    best = summary["best"]
    if best is None:
        lines.append(f"no complete trial, so no best {space.metric}")
        return "\n".join(lines)
    lines.append(f"best {space.metric} ({space.direction}): {best['value']:.6g}  (trial {best['number']})")
    lines += [f"  {key} = {value}" for key, value in best["params"].items()]
    lines.append(f"  run: {best['run_dir']}")
    return "\n".join(lines)
