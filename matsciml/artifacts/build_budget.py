"""A bound on what building a model from a file may allocate: no more than its weights could fill.

A package's ``model.json`` or a checkpoint's hyper-parameters are input: ``hidden=10**11`` must be
refused before torch allocates it, not after the model is built and its weights fail to load. Two
torch mechanisms that see every model (e3nn's included, which cannot be built on the meta device):

* a :class:`~torch.overrides.TorchFunctionMode` reads the size of each factory call (``torch.empty``,
  ``zeros``, ``randn``, ...) *before* the call allocates;
* the global parameter-registration hook counts the parameters as they are registered, before their
  initialisation writes them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.nn.parameter import UninitializedParameter
from torch.overrides import TorchFunctionMode

#: Numbers a build may allocate beyond twice its weights: temporaries such as e3nn's 10^6-sample
#: normalisation of activations (16 MiB of float32).
SLACK = 1 << 22
_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full})


class BudgetExceeded(ValueError):
    """The model being built is larger than its weights could fill."""


def _requested(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """Elements a factory call asks for: ``f(2, 3)``, ``f((2, 3))``, ``f(size=(2, 3))``, ``full((2, 3), x)``."""
    size = kwargs.get("size", args[0] if args and isinstance(args[0], tuple | list | torch.Size) else args)
    dims = [d for d in size if isinstance(d, int)] if isinstance(size, tuple | list | torch.Size) else []
    return math.prod(dims) if all(d >= 0 for d in dims) else 0  # negative sizes: torch's own error


class _FactoryLimit(TorchFunctionMode):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and (numel := _requested(args, kwargs)) > self.limit:
            raise BudgetExceeded(f"it asks for a tensor of {numel} numbers, more than its weights hold")
        return func(*args, **kwargs)


def check_spec_integers(init_args: Any, state: Mapping[str, torch.Tensor], where: str = "init_args") -> None:
    """Refuse any integer in a model's arguments above the budget of its weights (twice their numbers + SLACK).

    A depth or width cannot exceed the number of weights it creates, and a model constructor may
    spend Python memory on it before any tensor exists (``[hidden] * (depth - 1)``), which no
    torch hook sees.

    Raises:
        BudgetExceeded: naming the argument and its value.
    """
    cap = 2 * sum(v.numel() for v in state.values()) + SLACK
    if isinstance(init_args, bool):
        return
    if isinstance(init_args, int):
        if abs(init_args) > cap:
            raise BudgetExceeded(f"{where} = {init_args} is more than its {cap} weights could need")
    elif isinstance(init_args, Mapping):
        for key, value in init_args.items():
            check_spec_integers(value, state, f"{where}.{key}")
    elif isinstance(init_args, list | tuple):
        for position, value in enumerate(init_args):
            check_spec_integers(value, state, f"{where}[{position}]")


@contextlib.contextmanager
def weights_budget(state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, refuse models larger than ``state`` could fill (with a margin).

    The limits are twice the weights' tensors (+64) and twice their numbers (+ :data:`SLACK`), for
    any one factory call and for all parameters together: a module may replace a parameter it made.

    Raises:
        BudgetExceeded: at the first allocation or parameter past the limits.
    """
    count_cap = 2 * len(state) + 64
    numel_cap = 2 * sum(v.numel() for v in state.values()) + SLACK
    count = numel = 0

    def hook(module: torch.nn.Module, name: str, param: Any) -> None:
        nonlocal count, numel
        if param is None or isinstance(param, UninitializedParameter):
            return
        count, numel = count + 1, numel + param.numel()
        if count > count_cap or numel > numel_cap:
            raise BudgetExceeded(f"its parameters pass {min(count, count_cap)} tensors or {numel_cap} numbers")

    handle = register_module_parameter_registration_hook(hook)
    try:
        with _FactoryLimit(numel_cap):
            yield
    finally:
        handle.remove()
