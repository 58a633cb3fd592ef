"""Building blocks shared by the models: activations and plain MLPs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class _ShiftedSoftplusFunction(torch.autograd.Function):
    """``softplus(x) - log 2`` whose backward is ``grad * sigmoid(x)`` in plain, differentiable
    ops: force training differentiates it twice, and autograd's own softplus double backward
    goes through more element-wise kernels than this."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return nn.functional.softplus(x) - math.log(2.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class ShiftedSoftplus(nn.Module):
    """``softplus(x) - log 2``: smooth, and zero at zero (MEGNet's and SchNet's activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ShiftedSoftplusFunction.apply(x)


#: Activations by name. Smooth ones (all but relu) keep forces -dE/dx continuous.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "softplus": ShiftedSoftplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


def check_activation(name: str, allowed: Sequence[str] = tuple(ACTIVATIONS)) -> None:
    if name not in allowed:
        raise ValueError(f"activation must be one of {sorted(allowed)}, got {name!r}")


def mlp(sizes: Sequence[int], activation: str, last_activation: bool = False) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (and after the last)."""
    check_activation(activation)
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if index < len(sizes) - 2 or last_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


#: Last-layer weights start at this fraction of their default initialisation.
OUTPUT_GAIN = 1e-2


def init_output_layer(layer: nn.Linear, gain: float = OUTPUT_GAIN) -> None:
    """Start a model's last layer small (weights times ``gain``, zero bias).

    The raw output of an untrained model is then near zero, so the task's normaliser alone
    (shift per atom and element references) is its first prediction: the training mean or the
    least-squares composition fit, rather than that plus a random energy of the scale's size.
    The weights stay non-zero so every layer gets a gradient from the first step.
    """
    with torch.no_grad():
        layer.weight.mul_(gain)
        if layer.bias is not None:
            layer.bias.zero_()
