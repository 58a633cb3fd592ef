"""Argument types and the step-record config shared by the plain (argparse) subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def step_config(args: argparse.Namespace) -> dict:
    """The parsed arguments as plain data, for a step record."""
    return {
        k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
        for k, v in vars(args).items()
        if k != "func"
    }
