"""Accelerator names for the Trainer: an Intel XPU accelerator, and clear errors for absent devices.

Lightning 2.6 knows ``cpu``, ``cuda``/``gpu``, ``mps`` and ``tpu``. :class:`XPUAccelerator` adds
``accelerator="xpu"`` for Intel GPUs through ``torch.xpu`` (built into torch >= 2.4 XPU builds;
older torch gets it from ``intel_extension_for_pytorch``). DDP on XPU uses the process-group backend
torch maps to the device (``xccl`` in torch >= 2.8). It is registered when :mod:`matsciml.tasks` is
imported.

:func:`check_accelerator` runs before the CLI builds a Trainer: asking for a device the machine lacks
fails with what is missing and what to use instead, instead of Lightning's "No supported gpu backend".
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException


class AcceleratorUnavailable(MisconfigurationException):
    """The configured accelerator does not exist on this machine."""


def _torch_xpu():
    """``torch.xpu`` when usable, else the reason it is not."""
    if not hasattr(torch, "xpu"):
        try:  # torch < 2.4: Intel's extension adds torch.xpu
            importlib.import_module("intel_extension_for_pytorch")
        except ImportError:
            return None, (
                f"torch {torch.__version__} has no torch.xpu and intel_extension_for_pytorch is not installed"
            )
    if not torch.xpu.is_available():
        return None, (
            f"torch.xpu.is_available() is False: no Intel GPU is visible, or torch "
            f"{torch.__version__} was built without XPU support"
        )
    return torch.xpu, ""


def unavailable_reason(accelerator: Any) -> str | None:
    """Why ``accelerator`` cannot run here, or ``None`` if it can (or is chosen automatically)."""
    name = accelerator if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda"):
        if torch.cuda.is_available() or (name == "gpu" and torch.backends.mps.is_available()):
            return None
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"torch sees no CUDA device (torch {torch.__version__} is {build})"
    if name == "xpu":
        return _torch_xpu()[1] or None
    if name == "mps" and not torch.backends.mps.is_available():
        return "torch.backends.mps.is_available() is False (Apple silicon GPUs only)"
    return None


def check_accelerator(accelerator: Any) -> None:
    """Raise :class:`AcceleratorUnavailable` if ``accelerator`` names a device this machine lacks."""
    reason = unavailable_reason(accelerator)
    if reason is not None:
        raise AcceleratorUnavailable(
            f"trainer.accelerator={accelerator!r} was requested but {reason}. "
            "Use accelerator: cpu (or auto, which picks what is there), or run where that device is."
        )


def _parse_indices(devices: int | str | list[int]) -> list[int]:
    count = XPUAccelerator.auto_device_count()
    if isinstance(devices, str):
        devices = (
            int(devices) if devices.strip().lstrip("-").isdigit() else [int(i) for i in devices.split(",") if i.strip()]
        )
    if isinstance(devices, int):
        devices = list(range(count)) if devices == -1 else list(range(devices))
    missing = [i for i in devices if not 0 <= i < count]
    if missing:
        raise AcceleratorUnavailable(f"XPU devices {missing} requested but {count} are visible")
    return list(devices)


class XPUAccelerator(Accelerator):
    """Intel GPUs (``accelerator="xpu"``) through ``torch.xpu``. Untested here: no XPU machine."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "xpu":
            raise MisconfigurationException(f"device should be an XPU, got {device}")
        torch.xpu.set_device(device)

    def teardown(self) -> None:
        torch.xpu.empty_cache()

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return dict(torch.xpu.memory_stats(device))

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        return _parse_indices(devices)

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("xpu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        xpu = _torch_xpu()[0]
        return xpu.device_count() if xpu is not None else 0

    @staticmethod
    def is_available() -> bool:
        return _torch_xpu()[0] is not None

    @staticmethod
    def name() -> str:
        return "xpu"

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__)


def register_xpu() -> None:
    """Make ``accelerator="xpu"`` a valid Trainer argument (unless Lightning already has one)."""
    if "xpu" not in AcceleratorRegistry:
        XPUAccelerator.register_accelerators(AcceleratorRegistry)
