"""Training loaders: stored crops with their soft labels, fresh crops with hard labels, and
whole images for evaluation.

All three share one mechanism (:class:`CropLoader`): per epoch, a seeded order of the image
indices, sharded by ``rank``/``world_size`` like ``DistributedSampler``, cut into batches;
each batch's files are read, its crop windows rendered by a :mod:`~hald_store.pipeline`
renderer (DALI or torchvision) and its labels looked up, in a background thread that runs
``prefetch`` batches ahead of the consumer. They differ only in where an image's crop window
for an epoch comes from:

* :class:`SoftLabelLoader` -- the store's crop ``epoch_crop_seeds(...)[i]`` of image ``i``
  and its stored soft label;
* :class:`HardLabelLoader` -- a fresh crop from the same crop policy (stream 1 of the crop
  plan, crop seed = epoch), labelled with the image's class;
* :class:`EvalLoader` -- a centred square of each image, in folder order.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .codec import TopKLabels
from .crop_plan import CropPolicy, plan_crops
from .errors import HaldStoreError
from .images import Manifest, check_image_root, scan_image_folder
from .mixing import apply_mix
from .pipeline import IMAGENET_MEAN, IMAGENET_STD, CropRenderer, dali_available, make_renderer, read_files
from .prefetch import prefetch
from .store import LabelStore

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


def epoch_crop_seeds(num_images: int, crops_per_image: int, epoch: int, seed: int = 0) -> np.ndarray:
    """Stored crop seed that each image uses in ``epoch``.

    Epochs come in cycles of ``crops_per_image``; within a cycle every image uses each of its
    crops exactly once, in a per-image order ``(a * e + b) mod S`` with ``a`` coprime to ``S``
    and ``a, b`` drawn per image and cycle from ``seed``.
    """
    s = int(crops_per_image)
    cycle, e = divmod(int(epoch), s)
    units = np.array([a for a in range(1, s) if math.gcd(a, s) == 1] or [1], dtype=np.int64)
    rng = np.random.default_rng([int(seed), cycle, 0x5EED])
    a = units[rng.integers(len(units), size=num_images)]
    b = rng.integers(s, size=num_images)
    return (a * e + b) % s


def replay_epoch(crops_per_image: int, epoch: int, seed: int = 0) -> int:
    """The labelling epoch whose recorded batches training epoch ``epoch`` replays: the pool of
    ``crops_per_image`` labelling epochs is drawn without replacement, reshuffled every cycle."""
    cycle, e = divmod(int(epoch), int(crops_per_image))
    return int(np.random.default_rng([int(seed), cycle, 0xE90C]).permutation(crops_per_image)[e])


def render_recorded_batch(renderer: CropRenderer, files: Sequence[Path], plan: dict[str, np.ndarray], batch: int,
                          boxes: np.ndarray, flips: np.ndarray, mix: str) -> tuple[np.ndarray, torch.Tensor]:
    """Members and rendered, mixed images of recorded labelling batch ``batch`` (``plan`` =
    ``store.batches(epoch)``; ``boxes``/``flips``: that epoch's crop of every image, indexed by
    image): exactly what the teacher saw at build time."""
    members = plan["members"][batch]
    members = members[members >= 0]
    x = renderer(read_files([files[i] for i in members]), boxes[members], flips[members])
    n = len(members)
    return members, apply_mix(mix, x, plan["perm"][batch][:n], float(plan["lam"][batch]), plan["box"][batch])


def _renderer_device(device: str) -> str:
    """Map a user device (auto/cpu/cuda/gpu) to a renderer device (auto/cpu/gpu)."""
    mapping = {"auto": "auto", "cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}
    if str(device).split(":")[0] not in mapping:
        raise HaldStoreError(f"unknown device {device!r}; use auto, cpu or cuda")
    return mapping[str(device).split(":")[0]]


class CropLoader:
    """Shared batching, sharding, rendering and prefetching; see the module docstring."""

    def __init__(
        self,
        images_root: str | os.PathLike,
        manifest: Manifest,
        renderer: CropRenderer,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        prefetch: int,
        check_batch_size: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise HaldStoreError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise HaldStoreError(f"batch_size must be >= 1, got {batch_size}")
        self.root = Path(images_root)
        self.manifest = manifest
        self.renderer = renderer
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size, self.prefetch = int(rank), int(world_size), int(prefetch)
        self.epoch = 0
        self._paths = [self.root / p for p in manifest.paths]
        self._hard = torch.from_numpy(np.asarray(manifest.labels, dtype=np.int64))
        n = len(manifest)
        self.samples_per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        if check_batch_size and self.batch_size > self.samples_per_rank:
            raise HaldStoreError(
                f"batch_size {self.batch_size} is larger than the {self.samples_per_rank} images each of "
                f"{world_size} rank(s) gets from {n} images; use a batch size <= {self.samples_per_rank}"
            )

    @property
    def device(self) -> torch.device:
        """Where batches are delivered."""
        return self.renderer.torch_device

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        div = self.samples_per_rank / self.batch_size
        return math.floor(div) if self.drop_last else math.ceil(div)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that the next ``iter(loader)`` yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator:
        """Yield the batches of the current epoch, then advance to the next epoch."""
        yield from self.iter_epoch(self.epoch)
        self.epoch += 1

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """Batches ``start_batch, ...`` of ``epoch`` (resume mid-epoch with ``start_batch``)."""
        if not 0 <= start_batch <= len(self):
            raise HaldStoreError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        return prefetch(self._produce(int(epoch), int(start_batch)), self.prefetch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's image indices for ``epoch``, in delivery order."""
        n = len(self.manifest)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        total = self.samples_per_rank * self.world_size
        order = np.resize(order, total)  # pads by wrapping around, or truncates (drop_last)
        return order[self.rank :: self.world_size]

    def _produce(self, epoch: int, start_batch: int) -> Iterator:
        order = self.epoch_order(epoch)
        crops = self._epoch_crops(epoch)
        for b in range(start_batch, len(self)):
            ids = order[b * self.batch_size : (b + 1) * self.batch_size]
            boxes, flips = crops["boxes"][ids], crops["flips"][ids]
            x = self.renderer(read_files([self._paths[i] for i in ids]), boxes, flips)
            yield self._batch(x, ids, crops)

    def _epoch_crops(self, epoch: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _batch(self, images: torch.Tensor, ids: np.ndarray, crops: dict) -> HardBatch | SoftBatch:
        dev = images.device
        return HardBatch(images, self._hard[ids].to(dev), torch.from_numpy(ids).to(dev))


def _store_renderer(store: LabelStore, backend: str, device: str, **kw) -> CropRenderer:
    """A renderer that reproduces the store's pixels (its backend, size, normalization)."""
    info = store.attrs["renderer"]
    if backend == "auto":
        backend = info["backend"]
        if backend == "dali" and not dali_available():
            warnings.warn(
                "this store was labelled with DALI-rendered crops but DALI is not installed; using the "
                "torchvision renderer, whose pixels differ slightly (see the README's tolerance table)",
                stacklevel=3,
            )
            backend = "torchvision"
    return make_renderer(backend, size=store.attrs["input_size"], mean=store.attrs["mean"], std=store.attrs["std"],
                         device=_renderer_device(device), interpolation=info.get("interpolation", "bilinear"),
                         antialias=info.get("antialias", True), **kw)


def _open(store: LabelStore | str | os.PathLike) -> LabelStore:
    return store if isinstance(store, LabelStore) else LabelStore.open(store)


class SoftLabelLoader(CropLoader):
    """Stored crops with their soft labels: one stored crop per image and epoch, cycling
    through all of an image's crops before repeating one (:func:`epoch_crop_seeds`).

    ``soft`` is dense ``(B, C)`` probabilities at ``temperature`` (the store's by default) or,
    with ``dense=False``, :class:`~hald_store.codec.TopKLabels` (turn them into any temperature
    with ``.probs(T)`` / ``.log_probs(T)``). ``backend="auto"`` uses the backend the store was
    labelled with; ``device="auto"`` uses the GPU when CUDA is available.

    A store of batch-specific labels (built with ``teacher_mode="train"`` or a mix) is read in
    *replay* mode: training epoch ``e`` yields the recorded batches of labelling epoch
    :func:`replay_epoch` (the pool of labelling epochs drawn without replacement), each with
    its recorded members and mix applied to the regenerated crops; ``batch_size`` must equal
    the labelling batch size, ``shuffle`` shuffles the order of the batches and ``rank`` /
    ``world_size`` deal whole batches to ranks.
    """

    def __init__(
        self,
        store: LabelStore | str | os.PathLike,
        images_root: str | os.PathLike,
        *,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        temperature: float | None = None,
        dense: bool = True,
        backend: str = "auto",
        device: str = "auto",
        prefetch: int = 2,
        check_hashes: bool = False,
        replay: bool | None = None,
        **renderer_kw,
    ) -> None:
        self.store = _open(store)
        check_image_root(self.store.manifest(), images_root, check_hashes=check_hashes)
        self.replay = self.store.batch_mode if replay is None else bool(replay)
        if self.replay != self.store.batch_mode:
            raise HaldStoreError(
                f"store {self.store.path!r} holds batch-specific labels: read it with replay=True"
                if self.store.batch_mode else f"store {self.store.path!r} has no recorded labelling batches to replay"
            )
        if self.replay and batch_size != self.store.attrs["labelling"]["batch_size"]:
            raise HaldStoreError(
                f"replaying {self.store.path!r} needs batch_size = the labelling batch size "
                f"{self.store.attrs['labelling']['batch_size']} (its labels depend on the batch), got {batch_size}"
            )
        self.temperature = self.store.temperature if temperature is None else float(temperature)
        if not self.temperature > 0:
            raise HaldStoreError(f"temperature must be > 0, got {temperature}")
        self.dense = bool(dense)
        super().__init__(images_root, self.store.manifest(), _store_renderer(self.store, backend, device, **renderer_kw),
                         batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                         world_size=world_size, prefetch=prefetch, check_batch_size=not self.replay)

        if self.replay:  # recorded batches usable per epoch (a short last one is dropped with drop_last)
            members = self.store.array("batches/members")
            short = not (members[0, -1] >= 0).all()
            self._recorded_batches = members.shape[1] - int(short and self.drop_last)

    def __len__(self) -> int:
        if not self.replay:
            return super().__len__()
        return len(self.batch_order(0))

    def batch_order(self, epoch: int) -> np.ndarray:
        """Replay mode: this rank's recorded batch indices for ``epoch``, in delivery order."""
        usable = self._recorded_batches
        order = np.random.default_rng([self.seed, epoch]).permutation(usable) if self.shuffle else np.arange(usable)
        per_rank = usable // self.world_size if self.drop_last else -(-usable // self.world_size)
        if per_rank == 0:
            raise HaldStoreError(f"{usable} recorded batches cannot feed {self.world_size} ranks with drop_last")
        return np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]

    def _produce(self, epoch: int, start_batch: int) -> Iterator:
        if not self.replay:
            yield from super()._produce(epoch, start_batch)
            return
        n = self.store.num_images
        labelling_epoch = replay_epoch(self.store.crops_per_image, epoch, self.seed)
        plan = self.store.batches(labelling_epoch)
        seeds = np.full(n, labelling_epoch)
        fields, boxes, flips = self.store.read_one_crop_per_image(seeds)
        mix = self.store.attrs["labelling"]["mix"]
        for b in self.batch_order(epoch)[start_batch:]:
            members, x = render_recorded_batch(self.renderer, self._paths, plan, b, boxes, flips, mix)
            yield self._batch(x, members, {"fields": fields, "seeds": seeds})

    def crop_seeds(self, epoch: int) -> np.ndarray:
        """Stored crop seed of every image in ``epoch``."""
        return epoch_crop_seeds(self.store.num_images, self.store.crops_per_image, epoch, self.seed)

    def _epoch_crops(self, epoch: int) -> dict:
        seeds = self.crop_seeds(epoch)
        fields, boxes, flips = self.store.read_one_crop_per_image(seeds)
        return {"seeds": seeds, "boxes": boxes, "flips": flips, "fields": fields}

    def _batch(self, images: torch.Tensor, ids: np.ndarray, crops: dict) -> SoftBatch:
        dev = images.device
        labels = self.store.codec.decode({k: v[ids] for k, v in crops["fields"].items()})
        soft = labels.probs(self.temperature).to(dev) if self.dense else labels.to(dev)
        return SoftBatch(images, soft, self._hard[ids].to(dev), torch.from_numpy(ids).to(dev),
                         torch.from_numpy(crops["seeds"][ids]).to(dev))


class HardLabelLoader(CropLoader):
    """Fresh random crops (new ones every epoch, same crop policy) with the image's class.

    Build it from a store (``HardLabelLoader(store, images_root)``: the store's images, crop
    policy, input size and renderer) or from a plain image folder with
    :meth:`from_folder`.
    """

    def __init__(
        self,
        store: LabelStore | str | os.PathLike,
        images_root: str | os.PathLike,
        *,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "auto",
        device: str = "auto",
        prefetch: int = 2,
        check_hashes: bool = False,
        **renderer_kw,
    ) -> None:
        store = _open(store)
        manifest = store.manifest()
        check_image_root(manifest, images_root, check_hashes=check_hashes)
        self.crop_policy = store.crop_policy
        super().__init__(images_root, manifest, _store_renderer(store, backend, device, **renderer_kw),
                         batch_size=batch_size, shuffle=shuffle,
                         seed=store.attrs["plan_seed"] if seed is None else seed, drop_last=drop_last,
                         rank=rank, world_size=world_size, prefetch=prefetch)

    @classmethod
    def from_folder(
        cls,
        images_root: str | os.PathLike,
        *,
        input_size: int,
        crop_policy: CropPolicy = CropPolicy(),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "auto",
        device: str = "auto",
        prefetch: int = 2,
        progress: bool = False,
    ) -> "HardLabelLoader":
        """A hard-label loader over an image folder (scanned now), without a store."""
        self = cls.__new__(cls)
        self.crop_policy = crop_policy
        renderer = make_renderer(backend, size=input_size, mean=mean, std=std, device=_renderer_device(device))
        CropLoader.__init__(self, images_root, scan_image_folder(images_root, progress=progress), renderer,
                            batch_size=batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank,
                            world_size=world_size, prefetch=prefetch)
        return self

    def _epoch_crops(self, epoch: int) -> dict:
        m = self.manifest
        boxes, flips = plan_crops(self.seed, np.arange(len(m)), np.full(len(m), epoch), m.heights, m.widths,
                                  self.crop_policy, stream=HARD_CROP_STREAM)
        return {"boxes": boxes, "flips": flips}


class EvalLoader(CropLoader):
    """Whole images (a centred square covering ``crop_fraction`` of the shorter side, resized
    to ``input_size``), in folder order, with their class: for validation and testing."""

    def __init__(
        self,
        images_root: str | os.PathLike,
        *,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_fraction: float = 1.0,
        batch_size: int = 256,
        class_names: Sequence[str] | None = None,
        backend: str = "auto",
        device: str = "auto",
        prefetch: int = 2,
        progress: bool = False,
    ) -> None:
        if not 0 < crop_fraction <= 1:
            raise HaldStoreError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        manifest = scan_image_folder(images_root, progress=progress)
        if class_names is not None and list(class_names) != manifest.class_names:
            extra = sorted(set(manifest.class_names) - set(class_names))
            lacking = sorted(set(class_names) - set(manifest.class_names))
            raise HaldStoreError(
                f"the classes of {str(images_root)!r} differ from the expected ones"
                f"{f'; not expected: {extra[:5]}' if extra else ''}{f'; missing: {lacking[:5]}' if lacking else ''}"
                f"{'; same names in a different order' if not extra and not lacking else ''}"
            )
        self.crop_fraction = float(crop_fraction)
        renderer = make_renderer(backend, size=input_size, mean=mean, std=std, device=_renderer_device(device))
        super().__init__(images_root, manifest, renderer, batch_size=min(batch_size, len(manifest)), shuffle=False,
                         seed=0, drop_last=False, rank=0, world_size=1, prefetch=prefetch)

    def _epoch_crops(self, epoch: int) -> dict:
        h, w = self.manifest.heights.astype(np.int64), self.manifest.widths.astype(np.int64)
        side = np.maximum(1, np.round(np.minimum(h, w) * self.crop_fraction)).astype(np.int64)
        boxes = np.stack([(h - side) // 2, (w - side) // 2, side, side], axis=1).astype(np.int32)
        return {"boxes": boxes, "flips": np.zeros(len(h), dtype=bool)}
