"""Device names are resolved in one module (hald_store.devices): user names map to torch and
renderer devices, a CUDA index reaches the renderer, and asking for absent CUDA is one error."""

from __future__ import annotations

import pytest
import torch

from hald_store.devices import renderer_device, resolve_device
from hald_store.errors import OptionError
from hald_store.render import make_renderer

from .conftest import needs_cuda, no_cuda


def test_user_device_names_map_to_renderer_devices_with_their_index():
    assert [renderer_device(d) for d in ("auto", "cpu", "gpu", "cuda", "cuda:1", torch.device("cuda", 2))] == [
        ("auto", None), ("cpu", None), ("gpu", None), ("gpu", None), ("gpu", 1), ("gpu", 2)]
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(OptionError, match=f"device='{bad}': not a device"):
            renderer_device(bad)
    assert resolve_device("cpu") == torch.device("cpu") and make_renderer("torchvision", 8, device="cpu").device == "cpu"


@no_cuda
def test_absent_cuda_is_one_error_naming_what_was_asked():
    for ask in (lambda: resolve_device("cuda:1"), lambda: make_renderer("torchvision", 8, device="cuda:1")):
        with pytest.raises(OptionError, match=r"device='cuda:1' was requested but torch.cuda.is_available\(\) is False"):
            ask()


@needs_cuda
def test_a_cuda_index_reaches_the_renderer():
    last = torch.cuda.device_count() - 1
    r = make_renderer("torchvision", 8, device=f"cuda:{last}")
    assert r.torch_device == torch.device("cuda", last)
