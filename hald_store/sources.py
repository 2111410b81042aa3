"""Loader sources: where an epoch's crop windows, batches and labels come from.

A :class:`~hald_store.loader.CropLoader` takes one source, the way FFCV's loader takes an
``order=``; everything else (sharding, rendering, overlap) is the loader's:

* :class:`StoredCrops` -- the store's crop ``epoch_crop_seeds(...)[i]`` of image ``i`` with
  its stored soft label;
* :class:`RecordedBatches` -- batch-specific stores: the recorded labelling batches of one
  labelling epoch, with their recorded members and mix (replay);
* :class:`FreshCrops` -- a fresh crop from a crop policy (stream 1 of the crop plan, crop
  seed = epoch), labelled with the image's class;
* :class:`CentreCrops` -- a centred square of each image, in folder order (evaluation).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, NamedTuple

import numpy as np
import torch

from .codec import TopKLabels
from .crop_plan import CropPolicy, plan_crops
from .errors import HaldStoreError
from .images import Manifest
from .batch_plan import batch_members, mix_recorded
from .order import block_epoch_order, epoch_order, replay_batch_order, replay_epoch
from .store import LabelStore

if TYPE_CHECKING:
    from .loader import CropLoader

__all__ = ["HARD_CROP_STREAM", "Sampling", "SoftBatch", "HardBatch", "EpochCrops", "CropSource", "StoredCrops",
           "RecordedBatches", "FreshCrops", "CentreCrops"]

HARD_CROP_STREAM = 1  # crop-plan stream of fresh (hard-label) crops; stored crops use stream 0


class SoftBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float32, normalized
    soft: torch.Tensor | TopKLabels  # (B, C) probabilities at the loader's temperature, or top-k
    hard: torch.Tensor  # (B,) int64 class of the image
    image_ids: torch.Tensor  # (B,) int64 index in the store's manifest
    crop_seeds: torch.Tensor  # (B,) int64 stored crop seed


class HardBatch(NamedTuple):
    images: torch.Tensor
    hard: torch.Tensor
    image_ids: torch.Tensor


class EpochCrops(NamedTuple):
    """One epoch of a source: every image's window and flip, and the source's own arrays."""

    boxes: np.ndarray  # (N, 4) int (top, left, height, width)
    flips: np.ndarray  # (N,) bool
    extra: dict


class CropSource:
    """Base strategy: per-image crops, batches cut from the loader's sharded image order,
    hard labels. Subclasses override :meth:`crops` and, where they differ, the rest."""

    plan_ahead = False  # the loader computes the next epoch's crops while this one trains

    def crops(self, manifest: Manifest, epoch: int) -> EpochCrops:
        raise NotImplementedError

    def num_batches(self, loader: "CropLoader") -> int:
        return loader.image_batches()

    def epoch_order(self, num_images: int, epoch: int, sampling: "Sampling") -> np.ndarray:
        """One rank's image indices for ``epoch``, in delivery order."""
        return epoch_order(num_images, epoch, **sampling._asdict())

    def batches(self, loader: "CropLoader", epoch: int, crops: EpochCrops) -> list[np.ndarray]:
        order = loader.epoch_order(epoch)
        b = loader.batch_size
        return [order[i : i + b] for i in range(0, loader.num_batches() * b, b)]

    def make_batch(self, loader: "CropLoader", images: torch.Tensor, ids: np.ndarray, crops: EpochCrops,
                   position: int) -> HardBatch | SoftBatch:
        """The batch handed out for rendered ``images`` of images ``ids`` (batch ``position``)."""
        dev = images.device
        return HardBatch(images, loader.hard[ids].to(dev), torch.from_numpy(ids).to(dev))


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run small torch ops (label decoding, mixing) at one intra-op thread: with the data
    path's threads busy, torch at 2 threads was measured 20x slower on a (128, 200) softmax."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Sampling(NamedTuple):
    """A loader's sampling options: which share of each epoch it delivers, in which order."""

    seed: int
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False


class StoredCrops(CropSource):
    """Stored crops and their soft labels, one crop per image and epoch, cycling through all of
    an image's crops before repeating one (:meth:`~hald_store.store.LabelStore.epoch_crop_seeds`).

    Given the loader's ``sampling``, an epoch reads only that rank's images; ranks of a
    ``"sharded"`` store take whole blocks (:func:`~hald_store.order.block_epoch_order`), so each
    reads only its blocks."""

    plan_ahead = True  # an epoch's crops are one pass over the store

    def __init__(self, store: LabelStore, temperature: float, dense: bool, seed: int,
                 sampling: Sampling | None = None) -> None:
        if not temperature > 0:
            raise HaldStoreError(f"temperature must be > 0, got {temperature}")
        self.store, self.temperature, self.dense, self.seed = store, float(temperature), bool(dense), int(seed)
        self.sampling = sampling

    def crop_seeds(self, epoch: int) -> np.ndarray:
        return self.store.epoch_crop_seeds(epoch, self.seed)

    def epoch_order(self, num_images: int, epoch: int, sampling: Sampling) -> np.ndarray:
        if self.store.layout != "sharded":
            return super().epoch_order(num_images, epoch, sampling)
        return block_epoch_order(num_images, epoch, block=self.store.chunk_images, **sampling._asdict())

    def crops(self, manifest: Manifest, epoch: int) -> EpochCrops:
        seeds = self.crop_seeds(epoch)
        images = None if self.sampling is None else self.epoch_order(len(manifest), epoch, self.sampling)
        fields, boxes, flips = self.store.read_one_crop_per_image(seeds, images)
        return EpochCrops(boxes, flips, {"seeds": seeds, "fields": fields})

    def labels(self, ids: np.ndarray, crops: EpochCrops, dev: torch.device) -> torch.Tensor | TopKLabels:
        """Decoded labels of ``ids``: top-k moved to ``dev``, then made dense there."""
        with one_torch_thread():
            labels = self.store.codec.decode({k: v[ids] for k, v in crops.extra["fields"].items()}).to(dev)
            return labels.probs(self.temperature) if self.dense else labels

    def make_batch(self, loader, images, ids, crops, position) -> SoftBatch:
        dev = images.device
        return SoftBatch(images, self.labels(ids, crops, dev), loader.hard[ids].to(dev),
                         torch.from_numpy(ids).to(dev), torch.from_numpy(crops.extra["seeds"][ids]).to(dev))


class RecordedBatches(StoredCrops):
    """Replay of a batch-specific store: training epoch ``e`` yields the recorded batches of
    labelling epoch :func:`~hald_store.order.replay_epoch`, each with its recorded members and
    mix applied to the regenerated crops; whole batches are dealt to ranks."""

    def __init__(self, store: LabelStore, temperature: float, dense: bool, seed: int, drop_last: bool) -> None:
        super().__init__(store, temperature, dense, seed)
        self.mix = store.settings.labelling.mix
        members = store.array("batches/members")
        short = not (members[0, -1] >= 0).all()  # a short last batch is dropped with drop_last
        self.recorded = members.shape[1] - int(short and drop_last)

    def batch_order(self, loader: "CropLoader", epoch: int) -> np.ndarray:
        """This rank's recorded batch indices for ``epoch``, in delivery order."""
        return replay_batch_order(self.recorded, epoch, loader.seed, shuffle=loader.shuffle, rank=loader.rank,
                                  world_size=loader.world_size, drop_last=loader.drop_last)

    def num_batches(self, loader) -> int:
        return len(self.batch_order(loader, 0))

    def crop_seeds(self, epoch: int) -> np.ndarray:
        return np.full(self.store.num_images, replay_epoch(self.store.crops_per_image, epoch, self.seed))

    def crops(self, manifest, epoch) -> EpochCrops:
        crops = super().crops(manifest, epoch)
        crops.extra["plan"] = self.store.batches(int(crops.extra["seeds"][0]))
        crops.extra["order"] = None
        return crops

    def batches(self, loader, epoch, crops) -> list[np.ndarray]:
        plan = crops.extra["plan"]
        crops.extra["order"] = order = self.batch_order(loader, epoch)
        return [batch_members(plan, b) for b in order]

    def make_batch(self, loader, images, ids, crops, position) -> SoftBatch:
        plan, b = crops.extra["plan"], crops.extra["order"][position]
        with one_torch_thread():
            mixed = mix_recorded(self.mix, images, plan, b)
        return super().make_batch(loader, mixed, ids, crops, position)


class FreshCrops(CropSource):
    """New random crops every epoch from ``policy`` (crop seed = epoch, stream
    :data:`HARD_CROP_STREAM`), labelled with the image's class."""

    plan_ahead = True

    def __init__(self, policy: CropPolicy, seed: int) -> None:
        self.policy, self.seed = policy, int(seed)

    def crops(self, manifest, epoch) -> EpochCrops:
        n = len(manifest)
        boxes, flips = plan_crops(self.seed, np.arange(n), np.full(n, epoch), manifest.heights, manifest.widths,
                                  self.policy, stream=HARD_CROP_STREAM)
        return EpochCrops(boxes, flips, {})


class CentreCrops(CropSource):
    """A centred square covering ``fraction`` of each image's shorter side, no flip."""

    def __init__(self, fraction: float = 1.0) -> None:
        if not 0 < fraction <= 1:
            raise HaldStoreError(f"crop_fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def crops(self, manifest, epoch) -> EpochCrops:
        h, w = manifest.heights.astype(np.int64), manifest.widths.astype(np.int64)
        side = np.maximum(1, np.round(np.minimum(h, w) * self.fraction)).astype(np.int64)
        boxes = np.stack([(h - side) // 2, (w - side) // 2, side, side], axis=1).astype(np.int32)
        return EpochCrops(boxes, np.zeros(len(h), dtype=bool), {})
