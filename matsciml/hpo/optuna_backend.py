"""The Optuna backend: a study in ``<study-dir>/study.db`` (SQLite) that any number of workers share.

``--trials N`` means "until the study holds N trials", counting finished trials (complete,
pruned, failed) and those other workers are running; so re-running the command resumes a
study, and workers started side by side split the N trials between them without running
extra ones. Two details make that exact:

* the count and the creation of the next trial happen under a file lock
  (``<study-dir>/.ask.lock``); otherwise two workers seeing N-1 trials would both add one.
  Creating the database and the study takes the same lock: two workers starting together
  would otherwise both write Optuna's schema version into a new ``study.db`` and one would fail;
* trials send heartbeats to the database, so a trial whose worker was killed is marked FAIL
  after :data:`GRACE_S` seconds instead of counting as running forever.
"""

from __future__ import annotations

import fcntl
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from matsciml.hpo import HPOError
from matsciml.hpo.space import Parameter, SearchSpace, SpaceError, override
from matsciml.hpo.trial import PruningCallback, TrialFailed, link, run_fit, score, trial_dir

HEARTBEAT_S, GRACE_S = 10, 60
#: a trial that exists: everything but WAITING (enqueued by hand, not started)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def storage_url(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / 'study.db').resolve()}"


def _build(space: SearchSpace, key: str, classes: dict[str, Callable], default: Any) -> Any:
    spec = getattr(space, key)
    if spec is None:
        return default
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    try:
        return classes[spec["type"]](**kwargs)
    except (TypeError, ValueError) as err:
        raise SpaceError(f"{space.path}: {key}: {spec['type']} does not take {kwargs}: {err}") from None


def open_study(space: SearchSpace, study_dir: Path, name: str) -> optuna.Study:
    """Create the study, or load it if it exists; refuses one made for another metric or direction."""
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, stable since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # a generous SQLite timeout: workers write at the same moments (a trial ends, one starts)
        storage = optuna.storages.RDBStorage(
            storage_url(study_dir),
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            engine_kwargs={"connect_args": {"timeout": 60}},
        )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction=space.direction,
        sampler=_build(space, "sampler", SAMPLERS, None),
        pruner=_build(space, "pruner", PRUNERS, optuna.pruners.NopPruner()),  # pruning only when asked for
    )
    metric = study.user_attrs.get("metric")
    if metric is None:
        study.set_user_attr("metric", space.metric)
    if metric not in (None, space.metric) or study.direction.name.lower() != space.direction:
        raise HPOError(
            f"study {name!r} in {study_dir} optimises {metric or space.metric} "
            f"({study.direction.name.lower()}), {space.path} asks for {space.metric} ({space.direction}); "
            "use another --study-name or --study-dir"
        )
    return study


def suggest(trial: optuna.Trial, parameter: Parameter) -> Any:
    if parameter.type == "categorical":
        return trial.suggest_categorical(parameter.name, list(parameter.choices))
    if parameter.type == "int":
        return trial.suggest_int(
            parameter.name, parameter.low, parameter.high, step=parameter.step or 1, log=parameter.log
        )
    return trial.suggest_float(parameter.name, parameter.low, parameter.high, step=parameter.step, log=parameter.log)


class _AskLock:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies); ``release`` is idempotent."""

    def __init__(self, path: Path):
        self.file = open(path, "a")  # noqa: SIM115 - held across a call, released in release()
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def optimize(space: SearchSpace, base_config: Path, study_dir: Path, name: str, trials: int) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` of them; returns the summary for the study's record."""
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = _AskLock(study_dir / ".ask.lock")
    try:
        study = open_study(space, study_dir, name)
    finally:
        lock.release()
    url = storage_url(study_dir)
    fixed = [override(k, v) for k, v in space.fixed.items()]

    def objective(trial: optuna.Trial, lock: _AskLock) -> float:
        lock.release()  # the trial exists now: other workers may count it and ask for theirs
        params = {p.name: suggest(trial, p) for p in space.parameters.values()}
        run_dir = trial_dir(study_dir, trial.number)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        pruning = PruningCallback(trial, space.metric)
        facts = {"study": name, "storage": url, "trial": trial.number, "params": params}
        try:
            record = run_fit(base_config, [*fixed, *(override(k, v) for k, v in params.items())], run_dir, [pruning])
            if pruning.pruned_epoch is not None:
                link(run_dir, "optuna", {**facts, "state": "PRUNED", "pruned_at_epoch": pruning.pruned_epoch})
                raise optuna.TrialPruned(f"at epoch {pruning.pruned_epoch}")
            value = score(record, space.metric, run_dir)
        except (optuna.TrialPruned, HPOError):
            raise
        except Exception as err:  # noqa: BLE001 - one failing trial (e.g. out of memory) does not end the study
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            link(run_dir, "optuna", {**facts, "state": "FAIL"})
            raise TrialFailed(str(err)) from err
        link(run_dir, "optuna", {**facts, "state": "COMPLETE", "value": value})
        return value

    while True:
        lock = _AskLock(study_dir / ".ask.lock")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # killed workers' trials, so they do not count
            if len(study.get_trials(deepcopy=False, states=TAKEN)) >= trials:
                break
            study.optimize(functools.partial(objective, lock=lock), n_trials=1, catch=(TrialFailed,))
        finally:
            lock.release()
    return summarize(study, url)


def summarize(study: optuna.Study, url: str) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        trial = study.best_trial
        best = {
            "number": trial.number,
            "value": trial.value,
            "params": trial.params,
            "run_dir": trial.user_attrs.get("run_dir"),
        }
    return {"backend": "optuna", "study": study.study_name, "storage": url, "counts": counts, "best": best}
