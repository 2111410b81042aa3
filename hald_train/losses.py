"""The two losses of HALD training, and the hard phase's CutMix with label smoothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hald_store.mixing import apply_mix, cutmix_box, mix_targets


def soft_kl_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || softmax(student / T)), batch mean: the soft phases' loss.

    ``target_probs`` is the stored distribution at the same temperature (e.g. a
    :class:`~hald_store.SoftLabelLoader` batch's ``soft``). As in the reference code there is
    no ``T**2`` factor.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, target_probs.float(), reduction="batchmean")


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``(1 - smoothing) * one_hot + smoothing / C`` (smoothing 0.8 in the reference)."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    target = torch.full((len(labels), num_classes), smoothing / num_classes, device=labels.device)
    return target.scatter_add_(1, labels[:, None], torch.full((len(labels), 1), 1 - smoothing, device=labels.device))


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum(target * log_softmax(logits))``, batch mean."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix as timm's ``Mixup(cutmix_alpha=alpha)`` (batch mode) in the reference: one
    lambda ~ Beta(alpha, alpha) and one box (side ``sqrt(1 - lambda)``, centre uniform, clipped)
    per batch; image ``i`` gets that box of image ``n - 1 - i`` (the reversed batch) and the
    targets mix by the pasted area.

    An odd batch first loses its last sample, so that no image is paired with itself; the
    result can be one shorter than the input. ``alpha <= 0`` returns the batch unchanged.
    """
    if alpha <= 0:
        return images, targets
    n = len(images) // 2 * 2
    images, targets = images[:n], targets[:n]
    if n == 0:
        return images, targets
    box, lam = cutmix_box(float(rng.beta(alpha, alpha)), images.shape[-2], images.shape[-1], rng)
    reverse = np.arange(n)[::-1].copy()
    return apply_mix("cutmix", images, reverse, lam, box), mix_targets(targets, reverse, lam)
