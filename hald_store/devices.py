"""Device names, resolved here only: what a user types (auto, cpu, cuda, cuda:N, a torch
device) to a torch device (teacher, student) and to a renderer device (auto, cpu, gpu, with
its CUDA index); whether CUDA is there, and the one error when it is asked for and absent."""

from __future__ import annotations

import torch

from .errors import OptionError

__all__ = ["cuda_available", "require_cuda", "resolve_device", "renderer_device"]

_HELP = "use auto, cpu, cuda or cuda:N"


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return bool(torch.cuda.is_available())


def require_cuda(device: str | torch.device) -> None:
    """Raise :class:`OptionError` naming ``device`` when it asks for CUDA and this machine has none."""
    if not cuda_available():
        raise OptionError(f"device={str(device)!r} was requested but torch.cuda.is_available() is False; use "
                          "device='cpu' or device='auto'", "device")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` picks CUDA when available, else CPU; asking for CUDA without it is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise OptionError(f"device={str(device)!r}: not a device; {_HELP}", "device") from e
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"device={str(device)!r}: unsupported device type {dev.type!r}; {_HELP}", "device")
    if dev.type == "cuda":
        require_cuda(device)
    return dev


def renderer_device(device: str | torch.device) -> tuple[str, int | None]:
    """The renderer device (``auto``, ``cpu`` or ``gpu``) for a user device name or a torch
    device, and the CUDA index it names (``cuda:1`` -> 1; else None); ``gpu`` is another name
    for ``cuda``. Availability is checked where the renderer is made
    (:func:`~hald_store.render.make_renderer`)."""
    if isinstance(device, torch.device):
        kind, index = device.type, device.index
    else:
        kind, _, number = str(device).partition(":")
        index = int(number) if number.isdigit() else None
        if number and index is None:
            kind = str(device)  # cuda:x, not a device
    mapping = {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
    if kind not in mapping:
        raise OptionError(f"device={str(device)!r}: not a device; {_HELP}", "device")
    return mapping[kind], index
