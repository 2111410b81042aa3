"""The two losses of HALD training, and the hard phase's CutMix with label smoothing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hald_store.mixing import apply_mix, draw_mix, mix_targets


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
    """CutMix a batch with its own permutation: paste a box of image ``perm[i]`` into image
    ``i`` (lambda ~ Beta(alpha, alpha), box centre uniform, clipped at the border) and mix the
    targets by the pasted area. ``alpha <= 0`` returns the batch unchanged."""
    if alpha <= 0 or len(images) < 2:
        return images, targets
    perm, lam, box = draw_mix("cutmix", alpha, len(images), images.shape[-2], images.shape[-1], rng)
    return apply_mix("cutmix", images, perm, lam, box), mix_targets(targets, perm, lam)
