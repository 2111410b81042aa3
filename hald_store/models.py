"""Teacher and student models: the CIFAR ResNets and one resolver for model names.

A model spec is one of

* a name registered here (``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet44``,
  ``cifar_resnet56``, ``cifar_resnet110``),
* a torchvision classification model name (``resnet18``, ``mobilenet_v3_small``, ...),
  built without weights (nothing is downloaded; pass a checkpoint instead),
* ``package.module:factory`` for any callable returning an ``nn.Module``; it is called
  with ``num_classes=`` when it accepts that keyword.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError, preview

__all__ = [
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "resolve_model",
    "load_checkpoint",
    "file_sha256",
    "weights_sha256",
    "load_teacher",
]


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block with the parameter-free "option A" shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def cifar_resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def cifar_resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def cifar_resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    f.__name__: f
    for f in (cifar_resnet20, cifar_resnet32, cifar_resnet44, cifar_resnet56, cifar_resnet110)
}


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"model {spec!r}: cannot import module {module_name!r} ({e})") from e
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {attr!r} is not callable")
    return factory


def _accepts_num_classes(factory: Callable) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def resolve_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """Build an untrained model from a spec (see module docstring). Nothing is downloaded."""
    import torchvision

    if ":" in spec:
        factory = _import_factory(spec)
    elif spec in _REGISTRY:
        factory = _REGISTRY[spec]
    elif spec in torchvision.models.list_models(module=torchvision.models):
        factory = lambda **kw: torchvision.models.get_model(spec, weights=None, **kw)  # noqa: E731
    else:
        raise ModelError(
            f"unknown model {spec!r}: use one of {sorted(_REGISTRY)}, a torchvision classification "
            "model name (e.g. resnet18), or 'package.module:factory'"
        )
    kwargs = {"num_classes": num_classes} if num_classes is not None and _accepts_num_classes(factory) else {}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not a torch.nn.Module")
    model.hald_model_name = spec  # what a store records as its teacher (see model_name)
    return model


def model_name(model: nn.Module) -> str:
    """The spec ``model`` was resolved from (``cifar_resnet56``, ``resnet18``, ...), else its class name."""
    return getattr(model, "hald_model_name", type(model).__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (used to record checkpoints in store attributes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load weights into ``model`` and return the checkpoint's SHA-256.

    Accepts a bare state dict or a dict holding one under ``state_dict`` or ``model``;
    a ``module.`` prefix (from DataParallel/DDP) is stripped. Every parameter and buffer must
    match by name and shape (BatchNorm ``num_batches_tracked`` counters may be absent).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad files
        with open(path, "rb") as f:
            head = f.read(256)
        text = bool(head) and all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"checkpoint {path!r} cannot be read as a PyTorch checkpoint (a torch.save file)"
                         f"{'; it looks like a text file' if text else ''}: torch.load failed with "
                         f"{type(e).__name__}: {reason}") from e
    state = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path!r} holds no state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # Checkpoints older than PyTorch 0.4.1 have no BatchNorm step counters; keep the model's.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {preview(items)}")
        raise ModelError(f"checkpoint {path!r} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return file_sha256(path)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, dtypes, shapes and values), in key order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teacher(spec: str, checkpoint: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """Resolve ``spec`` and load ``checkpoint`` into it (when given); returns the model in eval mode."""
    model = resolve_model(spec, num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
