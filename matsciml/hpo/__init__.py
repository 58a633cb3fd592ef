"""``matsciml hpo``: hyperparameter search over ``matsciml fit`` runs (Optuna or SigOpt).

A study is two files: a normal ``fit`` config and a search space (:mod:`matsciml.hpo.space`).
Every trial is a complete ``fit`` run with its own run directory and step record; the study keeps
its own record (step ``hpo``) in the study directory. See ``docs/hpo.md``.

This package's ``__init__`` stays light (no torch, no Optuna) because ``matsciml.cli.app`` imports
:class:`HPOError` from it for every command.
"""

from __future__ import annotations


class HPOError(RuntimeError):
    """A search that cannot run as asked: a missing backend or token, a trial config ``fit`` rejects."""


__all__ = ["HPOError"]
