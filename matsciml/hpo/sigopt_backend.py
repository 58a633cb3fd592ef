"""The SigOpt backend: suggestions from a SigOpt experiment, each run as a ``fit`` trial.

Needs the ``sigopt`` client (``pip install matsciml[sigopt]``) and ``SIGOPT_API_TOKEN``
(``SIGOPT_API_URL`` for a self-hosted server). The experiment's id is kept in
``<study-dir>/sigopt.json``, so re-running the command continues it until it holds ``--trials``
observations. SigOpt has no pruning: a space file's ``pruner`` and ``sampler`` are ignored.

Written against SigOpt's core API (``Connection``, experiments, suggestions, observations) but
untested against a server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matsciml.hpo import HPOError
from matsciml.hpo.space import Parameter, SearchSpace, override
from matsciml.hpo.trial import link, run_fit, score, trial_dir
from matsciml.records.provenance import write_atomically


def connect() -> Any:
    """A SigOpt connection from the environment; :class:`HPOError` if the token or library is missing."""
    token = os.environ.get("SIGOPT_API_TOKEN")
    if not token:
        raise HPOError("--backend sigopt needs an API token in the environment variable SIGOPT_API_TOKEN")
    try:
        import sigopt
    except ImportError:
        raise HPOError("--backend sigopt needs the sigopt package: pip install 'matsciml[sigopt]'") from None
    connection = sigopt.Connection(client_token=token)
    if os.environ.get("SIGOPT_API_URL"):
        connection.set_api_url(os.environ["SIGOPT_API_URL"])
    return connection


def _parameter(parameter: Parameter) -> dict[str, Any]:
    if parameter.type == "categorical":  # SigOpt's categorical values are strings; mapped back in _values
        return {
            "name": parameter.name,
            "type": "categorical",
            "categorical_values": [json.dumps(c) for c in parameter.choices],
        }
    spec = {
        "name": parameter.name,
        "type": "double" if parameter.type == "float" else "int",
        "bounds": {"min": parameter.low, "max": parameter.high},
    }
    if parameter.log:
        spec["transformation"] = "log"
    return spec


def _values(space: SearchSpace, assignments: dict[str, Any]) -> dict[str, Any]:
    return {
        name: json.loads(value) if space.parameters[name].type == "categorical" else value
        for name, value in assignments.items()
    }


def optimize(
    space: SearchSpace, base_config: Path, study_dir: Path, name: str, trials: int, connection: Any
) -> dict[str, Any]:
    """Run suggestions until the experiment holds ``trials`` observations; returns the summary."""
    state_file = study_dir / "sigopt.json"
    if state_file.is_file():
        experiment = connection.experiments(json.loads(state_file.read_text())["experiment"]).fetch()
    else:
        experiment = connection.experiments().create(
            name=name,
            parameters=[_parameter(p) for p in space.parameters.values()],
            metrics=[{"name": space.metric, "objective": space.direction}],
            observation_budget=trials,
        )
        write_atomically(state_file, json.dumps({"experiment": experiment.id}) + "\n")
    handle = connection.experiments(experiment.id)
    fixed = [override(k, v) for k, v in space.fixed.items()]
    while handle.fetch().progress.observation_count < trials:
        suggestion = handle.suggestions().create()
        params = _values(space, dict(suggestion.assignments))
        run_dir = trial_dir(study_dir, str(suggestion.id))
        facts = {"experiment": experiment.id, "suggestion": suggestion.id, "params": params}
        try:
            record = run_fit(base_config, [*fixed, *(override(k, v) for k, v in params.items())], run_dir, [])
            value = score(record, space.metric, run_dir)
        except HPOError:
            handle.suggestions(suggestion.id).delete()
            raise
        except Exception:  # noqa: BLE001 - a failed fit or a diverged score (TrialFailed): a failed observation
            link(run_dir, "sigopt", {**facts, "state": "FAILED"})
            handle.observations().create(suggestion=suggestion.id, failed=True)
            continue
        link(run_dir, "sigopt", {**facts, "state": "COMPLETED", "value": value})
        handle.observations().create(suggestion=suggestion.id, values=[{"name": space.metric, "value": value}])
    return summarize(space, handle, study_dir, experiment.id)


def summarize(space: SearchSpace, handle: Any, study_dir: Path, experiment_id: Any) -> dict[str, Any]:
    observations = list(handle.observations().fetch().iterate_pages())
    failed = sum(bool(o.failed) for o in observations)
    best = None
    for assignment in handle.best_assignments().fetch().iterate_pages():
        observation = next((o for o in observations if o.id == assignment.id), None)
        best = {
            "number": assignment.id,
            "value": assignment.value,
            "params": _values(space, dict(assignment.assignments)),
            "run_dir": str(trial_dir(study_dir, str(observation.suggestion)).resolve()) if observation else None,
        }
        break
    return {
        "backend": "sigopt",
        "study": str(experiment_id),
        "storage": str(study_dir / "sigopt.json"),
        "counts": {"complete": len(observations) - failed, "pruned": 0, "fail": failed},
        "best": best,
    }
