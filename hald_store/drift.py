"""Local semantic drift measured from a store: how much the stored crops of one image disagree.

Per image, over its S stored crops' probabilities ``p_s = softmax(z_s / T)``:

* ``tr_cov``: the trace of their covariance (``n - 1`` denominator), the statistic of the
  HALD reference (``analysis/LVSD/LVSD.py``, ``compute_tr_sigma``), here from the stored labels
  instead of a re-run teacher; undefined (None) for S = 1;
* ``off_class``: the share of its crops whose top-1 is not the image's class (hard label);
* ``off_majority``: the share whose top-1 is not the image's majority top-1 (ties: lowest class).

One pass over the store, chunk by chunk, with the top-k codes never expanded per crop: with the
image mean ``m`` (dense, one row per image), ``||p_s - m||^2 = ||p_s||^2 - 2 p_s.m + ||m||^2``
needs only each crop's k probabilities and its shared rest probability, in float64. Memory is
bounded by a chunk of images (plus the per-image results). The ``top`` crops with the largest
``||p_s - m||^2`` (their share of their image's ``tr_cov``; for S = 1, the largest off-class mass
``1 - p_s[class]``) are kept for the gallery. Top-1 is the stored first index (the codec keeps
the teacher's top-1 the unique argmax).

Batch-specific stores labelled with a mix (CutMix/MixUp) are refused: a mixed crop's label
describes two images, so per-image drift is undefined there.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .codec import TopKLabels
from .errors import ImageError, OptionError, StoreError, check_at_least, check_positive_finite
from .images import DIGEST_SIZE
from .render import read_files, renderer_for
from .store import LabelStore

__all__ = ["DriftReport", "measure_drift", "write_drift"]

_ELEMS = 1 << 22  # per sub-batch: images * max(classes, crops * top_k) stays below this
STATS = ("tr_cov", "off_class", "off_majority")
S1_NOTE = "S = 1 crop per image: tr_cov (a covariance over crops) is undefined; only the top-1 shares are reported"


@dataclass
class DriftReport:
    """Per-image drift of a store (see the module docstring) and the most drifting crops."""

    store: str
    temperature: float
    crops_per_image: int
    class_names: list[str]
    labels: np.ndarray  # (N,) hard label
    tr_cov: np.ndarray | None  # (N,) float64; None for S = 1
    off_class: np.ndarray  # (N,) share of crops with top-1 != label
    off_majority: np.ndarray  # (N,) share of crops with top-1 != majority top-1
    majority: np.ndarray  # (N,) majority top-1 class
    top_crops: np.ndarray  # (n, 3) float64 rows (image, crop seed, score), most drifting first
    notes: list[str] = field(default_factory=list)

    def class_name(self, c: int) -> str:
        """The name of class ``c`` (a teacher may have more outputs than the store has class folders)."""
        return self.class_names[c] if c < len(self.class_names) else f"class {c}"

    def stats(self) -> dict[str, np.ndarray]:
        """The defined per-image statistics by name."""
        return {k: v for k in STATS if (v := getattr(self, k)) is not None}

    def summary(self) -> dict[str, Any]:
        """``{"overall": ..., "per_class": {name: ...}}``: images, and mean/median/p90 per statistic."""
        stats = self.stats()

        def describe(rows: np.ndarray) -> dict[str, Any]:
            out: dict[str, Any] = {"images": len(rows)}
            for name, values in stats.items():
                v = values[rows]
                out[name] = {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.quantile(v, 0.9))}
            return out

        order = np.argsort(self.labels, kind="stable")
        groups = np.split(order, np.cumsum(np.bincount(self.labels))[:-1])
        return {"overall": describe(order),
                "per_class": {self.class_name(c): describe(rows)
                              for c, rows in enumerate(groups) if len(rows)}}

    def to_dict(self) -> dict[str, Any]:
        """What ``drift.json`` holds (per-image rows go to ``drift_per_image.csv``)."""
        return {"store": self.store, "temperature": self.temperature, "crops_per_image": self.crops_per_image,
                "num_images": len(self.labels), "notes": self.notes, **self.summary(),
                "top_crops": [{"image": int(i), "crop_seed": int(s), "score": float(v)} for i, s, v in self.top_crops]}

    def __str__(self) -> str:
        s = self.summary()["overall"]
        lines = [f"drift of {len(self.labels):,} images x {self.crops_per_image} crops at T={self.temperature:g}"]
        for name in self.stats():
            lines.append(f"  {name:<13} mean {s[name]['mean']:.4g}  median {s[name]['median']:.4g}  "
                         f"p90 {s[name]['p90']:.4g}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _chunk_drift(labels: TopKLabels, hard: torch.Tensor, s: int, t: float) -> tuple[torch.Tensor, ...]:
    """Per image (n = len(hard)): tr_cov (NaN for S = 1), off_class, off_majority, majority, and
    per crop (n, S) the gallery score."""
    n, c = len(hard), labels.num_classes
    idx, ptop, prest = TopKLabels(labels.indices, labels.logits.double(), labels.rest_logit.double(), c).topk_probs(t)
    k = idx.shape[1]
    idx, ptop, prest = idx.view(n, s, k), ptop.view(n, s, k), prest.view(n, s)
    delta = ptop - prest[..., None]  # p_s at its top-k classes, above its rest probability
    flat_idx = idx.reshape(n, s * k)
    mean = prest.mean(1, keepdim=True).expand(n, c).clone().scatter_add_(1, flat_idx, delta.reshape(n, s * k) / s)
    sq = ptop.square().sum(2) + (c - k) * prest.square()  # ||p_s||^2
    dot = prest * mean.sum(1, keepdim=True) + (delta * mean.gather(1, flat_idx).view(n, s, k)).sum(2)  # p_s . m
    dist = (sq - 2 * dot + mean.square().sum(1, keepdim=True)).clamp_min_(0)  # ||p_s - m||^2
    top1 = idx[..., 0]
    counts = torch.zeros(n, c, dtype=torch.int64).scatter_add_(1, top1, torch.ones_like(top1))
    most, majority = counts.max(1)
    if s > 1:
        tr_cov, score = dist.sum(1) / (s - 1), dist
    else:
        own = prest + (delta * (idx == hard[:, None, None])).sum(2)  # p_s[class]
        tr_cov, score = torch.full((n,), float("nan"), dtype=torch.float64), 1 - own
    off_class = (top1 != hard[:, None]).double().mean(1)
    return tr_cov, off_class, 1 - most.double() / s, majority, score


def _keep_top(best: tuple[torch.Tensor, torch.Tensor], score: torch.Tensor, first: int, top: int) -> tuple:
    """Merge the (images, seeds) scores of images ``first..`` into the running ``top`` (flat keys, scores)."""
    s = score.shape[1]
    keys = torch.cat([best[0], first * s + torch.arange(score.numel())])
    values = torch.cat([best[1], score.reshape(-1)])
    order = torch.topk(values, min(top, len(values)), sorted=True).indices
    return keys[order], values[order]


def measure_drift(store: LabelStore | str | os.PathLike, temperature: float | None = None, top: int = 16, *,
                  progress: bool = True) -> DriftReport:
    """Drift of every image of a complete per-crop ``store`` at ``temperature`` (default: the
    store's), in one chunked pass; keeps the ``top`` most drifting crops for :func:`write_drift`."""
    check_positive_finite("temperature", temperature)
    check_at_least("top", top, 0)
    if not isinstance(store, LabelStore):
        store = LabelStore.open(store)
    plan = store.settings.labelling
    if plan is not None and plan.mix != "none":
        raise StoreError(f"store {store.path!r} holds batch-specific labels of mixed crops (mix={plan.mix}): a mixed "
                         "crop's label describes two images, so per-image drift is undefined; measure a store labelled "
                         "without a mix (build --mix none)")
    t = store.temperature if temperature is None else float(temperature)
    n, s, c, k = store.num_images, store.crops_per_image, store.num_classes, store.codec.top_k
    hard = torch.from_numpy(store.hard_labels())
    out = {name: torch.empty(n, dtype=torch.float64) for name in STATS}
    majority = torch.empty(n, dtype=torch.int64)
    best = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64))
    step = max(1, _ELEMS // max(c, s * k))
    fields = store.codec.fields()
    with torch.no_grad(), tqdm(total=n, desc="drift", unit="img", unit_scale=True, disable=not progress) as bar:
        for start in range(0, n, store.chunk_images):
            stop = min(start + store.chunk_images, n)
            chunk = {f: store.array(f"labels/{f}")[start:stop] for f in fields}
            for a in range(0, stop - start, step):
                b = min(a + step, stop - start)
                labels = store.codec.decode({f: v[a:b].reshape((b - a) * s, *v.shape[2:]) for f, v in chunk.items()})
                *stats, maj, score = _chunk_drift(labels, hard[start + a : start + b], s, t)
                for name, value in zip(STATS, stats):
                    out[name][start + a : start + b] = value
                majority[start + a : start + b] = maj
                if top:
                    best = _keep_top(best, score, start + a, top)
            bar.update(stop - start)
    keys, scores = best
    top_crops = np.stack([(keys // s).numpy(), (keys % s).numpy(), scores.numpy()], 1).astype(np.float64)
    return DriftReport(store=store.path, temperature=t, crops_per_image=s, class_names=store.class_names,
                       labels=hard.numpy(), tr_cov=out["tr_cov"].numpy() if s > 1 else None,
                       off_class=out["off_class"].numpy(), off_majority=out["off_majority"].numpy(),
                       majority=majority.numpy(), top_crops=top_crops, notes=[] if s > 1 else [S1_NOTE])


# ----------------------------------------------------------------------------------- output
def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _histograms(report: DriftReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report.stats()
    fig, axes = plt.subplots(1, len(stats), figsize=(4.5 * len(stats), 3.5), squeeze=False, layout="constrained")
    for ax, (name, values) in zip(axes[0], stats.items()):
        ax.hist(values, bins=min(50, max(10, len(values) // 20)), color="tab:blue")
        ax.set(xlabel=f"per-image {name}", ylabel="images", title=f"{name} (T={report.temperature:g})")
    fig.suptitle(f"{Path(report.store).name}: {len(report.labels):,} images x {report.crops_per_image} crops",
                 fontsize=9)
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _image_files(store: LabelStore, images: Path, ids: np.ndarray) -> list[Path]:
    """The files of images ``ids`` under ``images``, checked against the manifest (inside the root,
    same size and BLAKE2b): the manifest is untrusted input."""
    import hashlib

    manifest, root = store.manifest(), images.resolve()
    files = []
    for i in ids:
        path = (root / manifest.paths[i]).resolve()
        if not path.is_relative_to(root):
            raise ImageError(f"store {store.path!r}: manifest path {manifest.paths[i]!r} leaves the image root "
                             f"{str(images)!r}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {str(path)!r} (image {i} of store {store.path!r}): {e.strerror}") from e
        if hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest() != manifest.digests[i].tobytes():
            raise ImageError(f"{str(path)!r} differs from image {i} of store {store.path!r}: wrong IMAGES_DIR?")
        files.append(path)
    return files


def _gallery(report: DriftReport, store: LabelStore, images: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids, seeds = report.top_crops[:, 0].astype(np.int64), report.top_crops[:, 1].astype(np.int64)
    boxes, flips = store.boxes(ids, seeds)
    renderer = renderer_for(store.render_spec, device="cpu")
    pixels = renderer.render_uint8(read_files(_image_files(store, images, ids)), boxes, flips).cpu().numpy()
    idx, probs, _ = store.read(ids, seeds).topk_probs(report.temperature)

    cols = min(8, len(ids))
    rows = -(-len(ids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for j, ax in enumerate(axes.flat[: len(ids)]):
        ax.imshow(pixels[j])
        top3 = [f"{report.class_name(c)[:14]} {p:.2f}" for c, p in zip(idx[j, :3].tolist(), probs[j, :3].tolist())]
        title = f"image {ids[j]} crop {seeds[j]}: {report.class_name(report.labels[ids[j]])[:14]}"
        ax.set_title("\n".join([title, *top3]), fontsize=7)
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_drift(report: DriftReport, out: str | os.PathLike, images: str | os.PathLike | None = None) -> list[Path]:
    """Write ``drift.json``, ``drift_per_image.csv``, ``drift_hist.png`` and, with ``images`` (the
    store's image folder), ``drift_gallery.png`` into ``out``; each file replaced atomically."""
    out = Path(out)
    if images is not None and not Path(images).is_dir():
        raise OptionError(f"images={os.fspath(images)!r} is not a directory", "images")
    out.mkdir(parents=True, exist_ok=True)
    store = LabelStore.open(report.store)
    paths = store.manifest().paths
    written = [out / "drift.json", out / "drift_per_image.csv", out / "drift_hist.png"]
    _replace_atomically(written[0], lambda tmp: tmp.write_text(json.dumps(report.to_dict(), indent=1)))

    def rows(tmp: Path) -> None:
        stats = report.stats()
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "path", "label", *stats, "majority"])
            columns: Sequence = [np.arange(len(paths)), paths, report.labels,
                                 *(np.char.mod("%.6g", v) for v in stats.values()), report.majority]
            w.writerows(zip(*columns))

    _replace_atomically(written[1], rows)
    _histograms(report, written[2])
    if images is not None and len(report.top_crops):
        written.append(out / "drift_gallery.png")
        _gallery(report, store, Path(images), written[-1])
    return written
