"""Device names: the one translation from what a user types (auto, cpu, cuda, cuda:N) to a
torch device (teacher, student) and to a renderer device (auto, cpu, gpu)."""

from __future__ import annotations

import torch

from .errors import OptionError

__all__ = ["resolve_device", "renderer_device"]

_HELP = "use auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available, else CPU; asking for CUDA without it is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"device={str(device)!r}: not a device; {_HELP}", "device") from e
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"device={str(device)!r}: unsupported device type {dev.type!r}; {_HELP}", "device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device={str(device)!r}: CUDA is not available on this machine (use device='cpu')",
                          "device")
    return dev


def renderer_device(device: str | torch.device) -> str:
    """The renderer device (``auto``, ``cpu`` or ``gpu``) for a user device name or a torch
    device; ``gpu`` is accepted as another name for ``cuda``. Availability is the renderer's
    to check (:func:`~hald_store.render.make_renderer`)."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    mapping = {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
    if kind not in mapping:
        raise OptionError(f"device={str(device)!r}: not a device; {_HELP}", "device")
    return mapping[kind]
