"""The search space file of ``matsciml hpo``: what to tune, how to score it, what stays fixed.

.. code-block:: yaml

    metric: val/energy_mae            # a metric the task logs (docs/training.md, "Metrics")
    direction: minimize               # or maximize
    parameters:                       # dotted LightningCLI keys -> distributions
      model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.init_args.model.init_args.hidden: {type: int, low: 8, high: 32}
      data.init_args.batch_size: {type: categorical, choices: [4, 8]}
    fixed:                            # optional: the same override for every trial (the budget)
      trainer.max_epochs: 10
    pruner: {type: median, n_warmup_steps: 1}   # optional, Optuna only
    sampler: {type: tpe, seed: 0}               # optional, Optuna only

Everything is checked when the file is read, so a typo fails before the first trial with the
file and the key in the message.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL = ("metric", "direction", "parameters", "fixed", "pruner", "sampler")
#: keys each distribution takes besides ``type`` (the arguments of Optuna's ``suggest_*``)
DISTRIBUTIONS = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
}
PRUNERS = ("median", "percentile", "threshold", "hyperband", "successive_halving", "none")
SAMPLERS = ("tpe", "random")


class SpaceError(ValueError):
    """A search space file that does not describe a search; the message names the file and key."""


@dataclass(frozen=True)
class Parameter:
    """One tuned key: ``type`` float/int with ``low``, ``high`` (``log``, ``step``), or categorical ``choices``."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    metric: str
    direction: str
    parameters: dict[str, Parameter]
    fixed: dict[str, Any] = field(default_factory=dict)
    pruner: dict[str, Any] | None = None
    sampler: dict[str, Any] | None = None
    content: dict[str, Any] = field(default_factory=dict)  # the file as read, for the study's record


def override(key: str, value: Any) -> str:
    """``--key=value`` for LightningCLI, which reads the value as YAML (strings go as they are)."""
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and check a search space file; raises :class:`SpaceError` naming the file and key."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None

    def fail(key: str, problem: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {problem}")

    if not isinstance(content, dict):
        raise SpaceError(f"{path}: expected a mapping with {', '.join(TOP_LEVEL)}")
    unknown = sorted(set(content) - set(TOP_LEVEL))
    if unknown:
        raise fail(unknown[0], f"unknown key; a space file has {', '.join(TOP_LEVEL)}")
    metric = content.get("metric")
    if not isinstance(metric, str) or not metric:
        raise fail("metric", "give the logged metric to optimise, e.g. metric: val/energy_mae")
    direction = content.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise fail("direction", f"must be minimize or maximize, not {direction!r}")
    parameters = content.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise fail("parameters", "give at least one key to tune, e.g. model.init_args.lr: {type: float, ...}")
    parsed = {name: _parameter(name, spec, fail) for name, spec in parameters.items()}
    fixed = content.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "must map dotted keys to values, e.g. trainer.max_epochs: 10")
    for key in fixed:
        if key in parsed:
            raise fail(f"fixed.{key}", "is also a tuned parameter; keep it in one of the two")
    return SearchSpace(
        path,
        metric,
        direction,
        parsed,
        dict(fixed),
        _choice(content, "pruner", PRUNERS, fail),
        _choice(content, "sampler", SAMPLERS, fail),
        content,
    )


def _parameter(name: Any, spec: Any, fail) -> Parameter:
    if not isinstance(name, str) or not name or name.startswith("-"):
        raise fail(f"parameters.{name}", "keys are dotted config keys without dashes, e.g. model.init_args.lr")
    key = f"parameters.{name}"
    if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
        raise fail(f"{key}.type", f"must be one of {', '.join(DISTRIBUTIONS)}, got {_get(spec, 'type')!r}")
    kind = spec["type"]
    unknown = sorted(set(spec) - {"type", *DISTRIBUTIONS[kind]})
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown for type {kind}; it takes {', '.join(DISTRIBUTIONS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "give a non-empty list of values")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise fail(f"{key}.choices", f"values must be numbers, strings, booleans or null, not {choice!r}")
        return Parameter(name, kind, choices=tuple(choices))
    number = int if kind == "int" else (int, float)
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            raise fail(f"{key}.{bound}", f"must be a finite {'integer' if kind == 'int' else 'number'}, got {value!r}")
    if low >= high:
        raise fail(f"{key}.low", f"low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise fail(f"{key}.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise fail(f"{key}.low", f"a log-scaled range needs low > 0, got {low}")
    if step is not None:
        if log:
            raise fail(f"{key}.step", "step and log: true cannot be combined")
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise fail(f"{key}.step", f"must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
    return Parameter(name, kind, low=low, high=high, log=log, step=step)


def _choice(content: dict, key: str, names: tuple[str, ...], fail) -> dict[str, Any] | None:
    """``pruner`` / ``sampler``: a mapping with a known ``type``; the other keys are its arguments."""
    spec = content.get(key)
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in names:
        raise fail(f"{key}.type", f"must be one of {', '.join(names)}, got {_get(spec, 'type')!r}")
    return dict(spec)


def _get(spec: Any, key: str) -> Any:
    return spec.get(key) if isinstance(spec, dict) else spec
