"""Loader sources: where an epoch's crop windows, batches and labels come from.

A :class:`~hald_store.loader.CropLoader` takes one source, the way FFCV's loader takes an
``order=``; everything else (sharding, rendering, overlap) is the loader's:

* :class:`StoredCrops` -- the store's crop ``epoch_crop_seeds(...)[i]`` of image ``i`` with
  its stored soft label;
* :class:`RecordedBatches` -- batch-specific stores: the recorded labelling batches of one
  labelling epoch, with their recorded members and mix (replay);
* :class:`FixedCrops` -- the store's crop 0 of every image in every epoch, with its soft label
  (the "one soft label per image" baseline);
* :class:`FreshCrops` -- a fresh crop from a crop policy (stream 1 of the crop plan, crop
  seed = epoch), labelled with the image's class;
* :class:`CentreCrops` -- a centred square of each image, in folder order (evaluation).

A source never sees its loader: the loader passes what a call needs (the number of images, the
epoch, a :class:`Delivery`: sampling, batch size, device and the images' classes), and a
source's per-epoch state is a typed :class:`EpochCrops` (subclassed where a source keeps more).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from .codec import TopKLabels
from .crop_plan import CropPolicy, plan_crops
from .errors import HaldStoreError
from .images import Manifest
from .order import block_epoch_order, epoch_order, samples_per_rank
from .replay import batch_members, batch_path, mix_recorded, replay_batch_order, replay_epoch
from .store import LabelStore

__all__ = ["HARD_CROP_STREAM", "Sampling", "Delivery", "SoftBatch", "HardBatch", "EpochCrops", "StoredEpoch",
           "RecordedEpoch", "EpochPlan", "BatchLabels", "CropSource", "StoredCrops", "RecordedBatches", "FixedCrops",
           "FreshCrops", "CentreCrops"]

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


@dataclass(frozen=True)
class EpochCrops:
    """One epoch of a source: every image's window and flip."""

    boxes: np.ndarray  # (N, 4) int (top, left, height, width)
    flips: np.ndarray  # (N,) bool


@dataclass(frozen=True)
class StoredEpoch(EpochCrops):
    """An epoch of stored crops: each image's crop seed and the label fields of that crop."""

    seeds: np.ndarray  # (N,) int64 stored crop seed of each image
    fields: dict[str, np.ndarray]  # the codec's fields, one row per image


@dataclass(frozen=True)
class RecordedEpoch(StoredEpoch):
    """An epoch of replay: the recorded batches of its labelling epoch, and this rank's order of them."""

    recorded: dict[str, np.ndarray]  # :meth:`~hald_store.store.LabelStore.batches` of the labelling epoch
    order: np.ndarray  # recorded batch index of each batch delivered, in delivery order


BACKGROUND_IMAGES = 100_000  # plan the next epoch's crops of more images than this on a background thread
RESIDENT_BYTES = 64 << 20  # a store whose labels and crops take at most this (uncompressed) is read once
LABEL_CHUNK_VALUES = 1 << 22  # labels are decoded a chunk of batches at a time: <= 16 MB of dense float32


class BatchLabels:
    """An epoch's per-batch label tensors, decoded one chunk of batches at a time in one
    vectorized call (``decode(concatenated ids) -> tuple of tensors``) and sliced per batch
    (views); only the current chunk is kept. Decoding runs on the consumer's thread (torch
    work on a background thread can crash the worker processes that a stream forks), at one
    torch thread (see :func:`one_torch_thread`)."""

    def __init__(self, batches: list[np.ndarray], per_chunk: int,
                 decode: Callable[[np.ndarray], tuple]) -> None:
        self.batches, self.per_chunk, self.decode = batches, max(1, int(per_chunk)), decode
        self._chunk: tuple[int, tuple, np.ndarray] | None = None  # (chunk index, values, row offsets)

    def __getitem__(self, k: int) -> tuple:
        c, j = divmod(k, self.per_chunk)
        if self._chunk is None or self._chunk[0] != c:
            members = self.batches[c * self.per_chunk : (c + 1) * self.per_chunk]
            offsets = np.cumsum([0] + [len(ids) for ids in members])
            with one_torch_thread():
                self._chunk = (c, self.decode(np.concatenate(members)), offsets)
        _, values, offsets = self._chunk
        return tuple(v[offsets[j] : offsets[j + 1]] for v in values)


class Sampling(NamedTuple):
    """A loader's sampling options: which share of each epoch it delivers, in which order."""

    seed: int
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False


class Delivery(NamedTuple):
    """What a loader tells its source about the batches it delivers (values only: a plan made
    ahead must not keep the loader, and its busy pipeline, alive)."""

    sampling: Sampling
    batch_size: int
    device: torch.device
    hard: torch.Tensor  # (N,) int64 class of each image of the manifest


class EpochPlan(NamedTuple):
    """What a loader renders and hands out in one epoch (made ahead, off the critical path;
    labels are decoded as the epoch reaches them, a chunk of batches per call)."""

    crops: EpochCrops
    batches: list[np.ndarray]  # image ids of each batch, in delivery order
    requests: list  # the stream's (ids, boxes, flips) per batch
    labels: BatchLabels  # per-batch tensors that :meth:`CropSource.make_batch` attaches


class CropSource:
    """Base strategy: per-image crops, batches cut from the loader's sharded image order,
    hard labels. Subclasses override :meth:`crops` and, where they differ, the rest."""

    plan_ahead = False  # the loader plans the next epoch before this one ends

    def crops(self, manifest: Manifest, epoch: int) -> EpochCrops:
        raise NotImplementedError

    def check_unchanged(self) -> None:
        """Raise if what :meth:`crops` reads was replaced since it was opened. The loader runs it
        on its file-check thread before each epoch's first batch is handed out."""

    def slow_crops(self, manifest: Manifest) -> bool:
        """Whether :meth:`crops` is worth a background thread (else the next epoch is planned
        when first asked for: under load, starting a thread took milliseconds, longer than a
        32-px epoch of a small set trains)."""
        return len(manifest) > BACKGROUND_IMAGES

    def crop_count(self, manifest: Manifest) -> int:
        """How many distinct crops all epochs draw from (0: new ones every epoch). A loader
        keeps this many rendered crops when they fit (``cache_crops``)."""
        return 0

    def crop_keys(self, crops: EpochCrops) -> np.ndarray:
        """(N,) index of each image's crop this epoch in ``[0, crop_count)``."""
        raise NotImplementedError

    def num_batches(self, num_images: int, delivery: Delivery) -> int:
        """Batches per epoch on one rank: here cut from the rank's share of the images."""
        s = delivery.sampling
        div = samples_per_rank(num_images, s.world_size, s.drop_last) / delivery.batch_size
        return math.floor(div) if s.drop_last else math.ceil(div)

    def epoch_order(self, num_images: int, epoch: int, sampling: "Sampling") -> np.ndarray:
        """One rank's image indices for ``epoch``, in delivery order."""
        return epoch_order(num_images, epoch, **sampling._asdict())

    def batches(self, num_images: int, epoch: int, crops: EpochCrops, delivery: Delivery) -> list[np.ndarray]:
        """Image ids of each batch of ``epoch``, in delivery order."""
        order = self.epoch_order(num_images, epoch, delivery.sampling)
        b = delivery.batch_size
        return [order[i : i + b] for i in range(0, self.num_batches(num_images, delivery) * b, b)]

    def batch_labels(self, crops: EpochCrops, batches: list[np.ndarray], delivery: Delivery) -> BatchLabels:
        """Per-batch ``(hard, image ids)`` on the delivery's device."""
        dev, hard = delivery.device, delivery.hard

        def decode(ids: np.ndarray) -> tuple:
            ids_t = torch.from_numpy(ids)
            return hard[ids_t].to(dev), ids_t.to(dev)
        return BatchLabels(batches, len(batches), decode)

    def make_batch(self, images: torch.Tensor, plan: EpochPlan, position: int) -> HardBatch | SoftBatch:
        """The batch handed out for rendered ``images`` of batch ``position`` of ``plan``."""
        return HardBatch(images, *plan.labels[position])


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
        self._kept: dict[str, np.ndarray] | None = None  # a small store's label and crop arrays, read once
        self._table: torch.Tensor | None = None  # ... and its dense labels, decoded once (see labels)

    def crop_seeds(self, epoch: int) -> np.ndarray:
        return self.store.epoch_crop_seeds(epoch, self.seed)

    def epoch_order(self, num_images: int, epoch: int, sampling: Sampling) -> np.ndarray:
        if self.store.layout != "sharded":
            return super().epoch_order(num_images, epoch, sampling)
        return block_epoch_order(num_images, epoch, block=self.store.chunk_images, **sampling._asdict())

    def crop_count(self, manifest) -> int:
        return self.store.num_images * self.store.crops_per_image

    def crop_keys(self, crops: StoredEpoch) -> np.ndarray:
        return np.arange(len(crops.seeds), dtype=np.int64) * self.store.crops_per_image + crops.seeds

    def rank_images(self, num_images: int, epoch: int) -> np.ndarray | None:
        """The images an epoch reads from the store: the rank's share (``sampling``), or all (None)."""
        return None if self.sampling is None else self.epoch_order(num_images, epoch, self.sampling)

    def crops(self, manifest: Manifest, epoch: int) -> StoredEpoch:
        seeds = self.crop_seeds(epoch)
        kept = self._resident()
        if kept:  # a gather in memory: at 32 px an epoch trains faster than a pass over the store
            rows = np.arange(len(seeds))
            fields = {f: kept[f"labels/{f}"][rows, seeds] for f in self.store.codec.fields()}
            boxes, flips = kept["crops/box"][rows, seeds], kept["crops/flip"][rows, seeds]
        else:  # this rank's images only
            fields, boxes, flips = self.store.read_one_crop_per_image(seeds, self.rank_images(len(manifest), epoch))
        return StoredEpoch(boxes, flips, seeds, fields)

    def slow_crops(self, manifest) -> bool:
        return not self._resident()

    def check_unchanged(self) -> None:
        if self._resident():  # a pass over the store checks this itself (read_one_crop_per_image)
            self.store.check_identity()

    def _resident(self) -> dict[str, np.ndarray]:
        """Every crop's label fields, box and flip when they take at most :data:`RESIDENT_BYTES`
        (read once, then kept) of a block-layout store; else empty (each epoch reads the store:
        a sharded store was built so that an epoch reads only the crops it uses, rank by rank)."""
        if self._kept is None:
            names = [f"labels/{f}" for f in self.store.codec.fields()] + ["crops/box", "crops/flip"]
            small = (self.store.layout != "sharded"
                     and sum(self.store.array(n).nbytes for n in names) <= RESIDENT_BYTES)
            kept = {n: self.store.array(n)[...] for n in names} if small else {}
            if kept:  # untrusted like every read: damage is named once, here
                self.store.check_classes("labels/indices", kept["labels/indices"])
            self._kept = kept
        return self._kept

    def labels(self, ids: np.ndarray, crops: StoredEpoch, dev: torch.device) -> torch.Tensor | TopKLabels:
        """Decoded labels of images ``ids`` (any number of rows, one vectorized call): top-k
        moved to ``dev``, then made dense there. Dense labels of a store read once (see
        ``_resident``) are decoded once for every stored crop, when they take at most
        :data:`RESIDENT_BYTES`, and gathered: the same values (decoding is row by row), without
        an epoch's decode on the training thread."""
        table = self._dense_table(dev) if self.dense else None
        if table is not None:
            rows = ids * self.store.crops_per_image + crops.seeds[ids]
            return table[torch.from_numpy(rows).to(dev)]
        labels = self.store.codec.decode({k: v[ids] for k, v in crops.fields.items()}).to(dev)
        return labels.probs(self.temperature) if self.dense else labels

    def _dense_table(self, dev: torch.device) -> torch.Tensor | None:
        """Every stored crop's dense label on ``dev`` (row ``image * S + crop``), or None where
        the store is not kept in memory or the table would exceed :data:`RESIDENT_BYTES`."""
        kept = self._resident()
        rows = self.store.num_images * self.store.crops_per_image
        if not kept or rows * self.store.num_classes * 4 > RESIDENT_BYTES:
            return None
        if self._table is None or self._table.device != dev:
            fields = {f: kept[f"labels/{f}"].reshape(rows, *kept[f"labels/{f}"].shape[2:])
                      for f in self.store.codec.fields()}
            self._table = self.store.codec.decode(fields).to(dev).probs(self.temperature)
        return self._table

    def batch_labels(self, crops: StoredEpoch, batches: list[np.ndarray], delivery: Delivery) -> BatchLabels:
        """Per-batch ``(soft, hard, image ids, crop seeds)``, decoded a chunk of batches at a time."""
        dev, hard, seeds = delivery.device, delivery.hard, crops.seeds
        rows = LABEL_CHUNK_VALUES // max(1, self.store.num_classes if self.dense else self.store.codec.top_k)

        def decode(ids: np.ndarray) -> tuple:
            ids_t = torch.from_numpy(ids)
            return (self.labels(ids, crops, dev), hard[ids_t].to(dev), ids_t.to(dev),
                    torch.from_numpy(seeds[ids]).to(dev))
        return BatchLabels(batches, rows // delivery.batch_size, decode)

    def make_batch(self, images, plan, position) -> SoftBatch:
        return SoftBatch(images, *plan.labels[position])


class RecordedBatches(StoredCrops):
    """Replay of a batch-specific store: training epoch ``e`` yields the recorded batches of
    labelling epoch :func:`~hald_store.replay.replay_epoch`, each with its recorded members and
    mix applied to the regenerated crops; whole batches are dealt to ranks by ``sampling``."""

    def __init__(self, store: LabelStore, temperature: float, dense: bool, sampling: Sampling) -> None:
        super().__init__(store, temperature, dense, sampling.seed, sampling)
        self.mix = store.settings.labelling.mix
        members = store.array(batch_path("members"))
        short = not (members[0, -1] >= 0).all()  # a short last batch is dropped with drop_last
        self.recorded = members.shape[1] - int(short and sampling.drop_last)

    def batch_order(self, epoch: int) -> np.ndarray:
        """This rank's recorded batch indices for ``epoch``, in delivery order."""
        return replay_batch_order(self.recorded, epoch, **self.sampling._asdict())

    def num_batches(self, num_images, delivery) -> int:
        return len(self.batch_order(0))

    def rank_images(self, num_images, epoch) -> None:
        return None  # ranks get whole recorded batches, of any images

    def crop_seeds(self, epoch: int) -> np.ndarray:
        return np.full(self.store.num_images, replay_epoch(self.store.crops_per_image, epoch, self.seed))

    def crops(self, manifest, epoch) -> RecordedEpoch:
        crops = super().crops(manifest, epoch)
        return RecordedEpoch(crops.boxes, crops.flips, crops.seeds, crops.fields,
                             self.store.batches(int(crops.seeds[0])), self.batch_order(epoch))

    def batches(self, num_images, epoch, crops: RecordedEpoch, delivery) -> list[np.ndarray]:
        return [batch_members(crops.recorded, b) for b in crops.order]

    def make_batch(self, images, plan, position) -> SoftBatch:
        with one_torch_thread():
            mixed = mix_recorded(self.mix, images, plan.crops.recorded, plan.crops.order[position])
        return super().make_batch(mixed, plan, position)


class FixedCrops(StoredCrops):
    """Stored crop 0 of every image in every epoch, with its soft label: the "one soft label per
    image" baseline (a single view per image, as in distillation from fixed teacher outputs)."""

    def crop_seeds(self, epoch: int) -> np.ndarray:
        return np.zeros(self.store.num_images, dtype=np.int64)

    def crop_count(self, manifest) -> int:
        return self.store.num_images

    def crop_keys(self, crops) -> np.ndarray:
        return np.arange(len(crops.seeds), dtype=np.int64)


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
        return EpochCrops(boxes, flips)


class CentreCrops(CropSource):
    """A centred square covering ``fraction`` of each image's shorter side, no flip."""

    def __init__(self, fraction: float = 1.0) -> None:
        if not 0 < fraction <= 1:
            raise HaldStoreError(f"crop_fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def crop_count(self, manifest) -> int:
        return len(manifest)

    def crop_keys(self, crops) -> np.ndarray:
        return np.arange(len(crops.flips), dtype=np.int64)

    def crops(self, manifest, epoch) -> EpochCrops:
        h, w = manifest.heights.astype(np.int64), manifest.widths.astype(np.int64)
        side = np.maximum(1, np.round(np.minimum(h, w) * self.fraction)).astype(np.int64)
        boxes = np.stack([(h - side) // 2, (w - side) // 2, side, side], axis=1).astype(np.int32)
        return EpochCrops(boxes, np.zeros(len(h), dtype=bool))
