"""Check a store against its teacher: re-render sampled crops, re-run the teacher, compare.

The codec itself loses a little (top-k truncation, quantization); that loss is measured on
the fresh outputs (encode, decode, KL to the full distribution) and a store passes when its
stored labels are no further from the fresh teacher than that, within a small slack.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .build import resolve_device
from .pipeline import make_renderer, read_files
from .store import LabelStore


@dataclass
class VerifyReport:
    num_crops: int
    temperature: float
    top1_agreement: float  # stored top-1 == fresh teacher top-1
    mean_kl: float  # KL(fresh || stored) at `temperature`, nats
    codec_mean_kl: float  # KL(fresh || encode-decode(fresh)): what the codec alone explains
    max_kl: float
    min_agreement: float
    kl_tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict}: {self.num_crops} crops at T={self.temperature:g}\n"
            f"top-1 agreement  {100 * self.top1_agreement:.2f}% (need >= {100 * self.min_agreement:.2f}%)\n"
            f"mean KL          {self.mean_kl:.3e} nats (codec alone explains {self.codec_mean_kl:.3e}; "
            f"allowed {self.kl_tolerance:.3e}); max {self.max_kl:.3e}"
        )


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


def teacher_logits(
    store: LabelStore,
    images: str | os.PathLike,
    teacher: nn.Module,
    image_ids: np.ndarray,
    seeds: np.ndarray,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """Fresh teacher logits (n, C) float32 on CPU for stored crops ``(image_ids[i], seeds[i])``,
    re-rendered with the store's own backend, input size and normalization."""
    dev = resolve_device(device)
    a = store.attrs
    renderer = make_renderer(a["renderer"]["backend"], size=a["input_size"], mean=a["mean"], std=a["std"],
                             device="gpu" if dev.type == "cuda" else "cpu")
    paths = store.manifest().paths
    boxes, flips = store.boxes(image_ids, seeds)
    teacher = teacher.to(dev).eval()
    out = []
    for b0 in range(0, len(image_ids), batch_size):
        sel = slice(b0, b0 + batch_size)
        x = renderer(read_files([Path(images, paths[i]) for i in image_ids[sel]]), boxes[sel], flips[sel])
        with torch.inference_mode():
            out.append(teacher(x.to(dev)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, store.num_classes)


def verify_store(
    store: LabelStore | str | os.PathLike,
    images: str | os.PathLike,
    teacher: nn.Module,
    *,
    sample: int = 256,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    temperature: float | None = None,
    min_agreement: float = 0.99,
    kl_factor: float = 2.0,
    kl_slack: float = 1e-3,
) -> VerifyReport:
    """Compare ``sample`` random stored crops with a fresh teacher pass on regenerated pixels.

    Passes when top-1 agreement >= ``min_agreement`` and the mean KL is at most
    ``kl_factor * codec_mean_kl + kl_slack``.
    """
    if not isinstance(store, LabelStore):
        store = LabelStore.open(store)
    store.check_images(images)
    temperature = store.temperature if temperature is None else float(temperature)
    rng = np.random.default_rng(seed)
    flat = rng.choice(store.num_crops, size=min(sample, store.num_crops), replace=False)
    img, seeds = np.divmod(flat, store.crops_per_image)
    fresh_logits = teacher_logits(store, images, teacher, img, seeds, batch_size=batch_size, device=device)
    fresh_log = torch.log_softmax(fresh_logits / temperature, dim=1)
    stored = store.read(img, seeds)
    kl = _kl(fresh_log, stored.log_probs(temperature))
    codec_kl = _kl(fresh_log, store.codec.decode(store.codec.encode(fresh_logits)).log_probs(temperature))
    agreement = float((stored.indices[:, 0] == fresh_logits.argmax(dim=1)).double().mean())
    tolerance = kl_factor * float(codec_kl.mean()) + kl_slack
    return VerifyReport(
        num_crops=len(img), temperature=temperature, top1_agreement=agreement, mean_kl=float(kl.mean()),
        codec_mean_kl=float(codec_kl.mean()), max_kl=float(kl.max()), min_agreement=min_agreement,
        kl_tolerance=tolerance, passed=agreement >= min_agreement and float(kl.mean()) <= tolerance,
    )
