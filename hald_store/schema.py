"""The store schema: the typed form of a store's ``hald_store`` attributes (format version 2;
format 1 differs only in the codec's form, which :meth:`LabelCodec.from_dict` reads).

:class:`StoreSettings` says everything needed to reproduce a store: the teacher, the label
codec, the crop policy, how crops are rendered (:class:`RenderSpec`), the plan seed, the counts,
the labelling plan of batch-specific labels (:class:`LabellingPlan`, or None), the manifest
fingerprint and where an imported or re-encoded store came from. ``to_dict`` writes exactly
the attribute JSON that ``zarr.json`` holds and ``from_dict`` reads it back, the way
:class:`~hald_store.codec.LabelCodec` and :class:`~hald_store.crop_plan.CropPolicy` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Protocol, Sequence

from ._version import __version__
from .batch_plan import BatchPlan
from .choices import LAYOUTS, TEACHER_MODES
from .codec import LabelCodec
from .crop_plan import CropPolicy
from .errors import OptionError, StoreError, preview

__all__ = ["TEACHER_MODES", "LAYOUTS", "check_choice", "TeacherInfo", "RenderSpec", "LabellingPlan", "StoreSettings"]

# Attributes of a store that are not settings: LabelStore writes them, resume checks ignore them.
NOT_SETTINGS = ("format", "format_version", "integrity", "identity")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise :class:`OptionError` unless ``value`` (the parameter ``name``) is one of ``choices``."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(choices)}, got {value!r}", name)


def _require(d: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise StoreError(f"{what} lacks {preview(map(repr, missing))}: the store is damaged or not a hald-store "
                         "store")


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher that made the labels: its name, the SHA-256 of its weights (None when
    unknown, e.g. imported labels) and its mode (``"train"``: BatchNorm on batch statistics)."""

    name: str
    weights_sha256: str | None = None
    mode: str = "eval"
    extra: Mapping[str, Any] = field(default_factory=dict)  # further keys, kept as written

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "mode": self.mode, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TeacherInfo":
        _require(d, ("name",), "the teacher attribute")
        known = ("name", "weights_sha256", "mode")
        return cls(d["name"], d.get("weights_sha256"), d.get("mode", "eval"),
                   {k: v for k, v in d.items() if k not in known})


class Recording(Protocol):
    """What :meth:`RenderSpec.of` reads: a renderer's record (:meth:`~hald_store.render.CropRenderer.record`)."""

    def record(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RenderSpec:
    """How the store's crops were rendered: what a loader needs to reproduce their pixels
    (:func:`~hald_store.render.renderer_for` builds the renderer that does)."""

    backend: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    antialias: bool = True
    versions: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"torchvision_version": ...}

    @classmethod
    def of(cls, renderer: Recording) -> "RenderSpec":
        """The spec a store records for ``renderer``."""
        r = renderer.record()
        return cls.from_dict({"input_size": r["size"], "mean": r["mean"], "std": r["std"], "renderer": r})

    def to_dict(self) -> dict[str, Any]:
        """The attributes ``input_size``, ``mean``, ``std`` and ``renderer``."""
        mean, std = [float(m) for m in self.mean], [float(s) for s in self.std]
        renderer = {"backend": self.backend, "interpolation": self.interpolation, "antialias": self.antialias,
                    "size": int(self.size), "mean": mean, "std": std, **self.versions}
        return {"input_size": int(self.size), "mean": mean, "std": std, "renderer": renderer}

    @classmethod
    def from_dict(cls, attrs: Mapping[str, Any]) -> "RenderSpec":
        _require(attrs, ("input_size", "mean", "std", "renderer"), "the store attributes")
        r = attrs["renderer"]
        _require(r, ("backend",), "the renderer attribute")
        known = ("backend", "interpolation", "antialias", "size", "mean", "std")
        return cls(r["backend"], int(attrs["input_size"]), tuple(attrs["mean"]), tuple(attrs["std"]),
                   r.get("interpolation", "bilinear"), bool(r.get("antialias", True)),
                   {k: v for k, v in r.items() if k not in known})


@dataclass(frozen=True)
class LabellingPlan:
    """The recorded labelling batches of batch-specific labels (see
    :class:`~hald_store.batch_plan.BatchPlan`); ``seed`` and ``mix_alpha`` are None for
    imported labels, whose batches were recorded, not planned."""

    teacher_mode: str
    num_images: int
    epochs: int
    batch_size: int
    seed: int | None
    mix: str
    mix_alpha: float | None
    size: int

    @classmethod
    def of(cls, plan: BatchPlan, teacher_mode: str) -> "LabellingPlan":
        """The record of a planned labelling (:class:`~hald_store.batch_plan.BatchPlan`)."""
        return cls(teacher_mode, plan.num_images, plan.epochs, plan.batch_size, plan.seed, plan.mix, plan.mix_alpha,
                   plan.size)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "batch", "teacher_mode": self.teacher_mode, "num_images": self.num_images,
                "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed, "mix": self.mix,
                "mix_alpha": self.mix_alpha, "size": self.size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabellingPlan":
        keys = ("teacher_mode", "num_images", "epochs", "batch_size", "seed", "mix", "mix_alpha", "size")
        _require(d, keys, "the labelling attribute")
        return cls(**{k: d[k] for k in keys})


@dataclass(frozen=True)
class StoreSettings:
    """Everything a store's contents depend on (the ``hald_store`` attributes less ``format``,
    ``format_version`` and ``integrity``, which :class:`~hald_store.store.LabelStore` adds)."""

    num_images: int
    crops_per_image: int
    num_classes: int
    class_names: tuple[str, ...]
    plan_seed: int
    crop_policy: CropPolicy
    render_spec: RenderSpec
    teacher: TeacherInfo
    codec: LabelCodec
    manifest_blake2b: str
    skipped: tuple[Mapping[str, Any], ...] = ()  # images left out by the scan (path and reason)
    labelling: LabellingPlan | None = None  # batch-specific labels: the recorded labelling batches
    imported_from: Mapping[str, Any] | None = None  # labels imported from reference files
    reencoded_from: LabelCodec | None = None  # labels re-encoded from a store with this codec
    layout: str = "block"  # one of LAYOUTS; stores made before layouts are "block"
    library_version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)  # further attributes, kept as written

    def to_dict(self) -> dict[str, Any]:
        """The attribute JSON (a plain dict), in the key order stores have always had."""
        d = {"library_version": self.library_version, "num_images": int(self.num_images),
             "crops_per_image": int(self.crops_per_image), "num_classes": int(self.num_classes),
             "class_names": list(self.class_names), "plan_seed": self.plan_seed,
             "crop_policy": self.crop_policy.to_dict(), **self.render_spec.to_dict(), "teacher": self.teacher.to_dict(),
             "codec": self.codec.to_dict(), "manifest_blake2b": self.manifest_blake2b,
             "skipped": [dict(s) for s in self.skipped]}
        if self.labelling is not None:
            d["labelling"] = self.labelling.to_dict()
        if self.imported_from is not None:
            d["imported_from"] = dict(self.imported_from)
        if self.reencoded_from is not None:
            d["reencoded_from"] = self.reencoded_from.to_dict()
        if self.layout != "block":  # "block" stores keep the attributes they always had
            d["layout"] = self.layout
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreSettings":
        """Read a store's attributes (``format``, ``format_version`` and ``integrity`` are ignored)."""
        required = ("num_images", "crops_per_image", "num_classes", "class_names", "plan_seed", "crop_policy",
                    "teacher", "codec", "manifest_blake2b")
        _require(d, required, "the store attributes")
        known = (*required, "input_size", "mean", "std", "renderer", "skipped", "labelling", "imported_from",
                 "reencoded_from", "layout", "library_version", *NOT_SETTINGS)
        if d.get("layout", "block") not in LAYOUTS:
            raise StoreError(f"the store layout {d['layout']!r} is not one of {', '.join(LAYOUTS)} (a newer "
                             "hald-store wrote it, or the store is damaged)")
        try:
            return cls(
                num_images=int(d["num_images"]), crops_per_image=int(d["crops_per_image"]),
                num_classes=int(d["num_classes"]), class_names=tuple(d["class_names"]), plan_seed=d["plan_seed"],
                crop_policy=CropPolicy.from_dict(d["crop_policy"]), render_spec=RenderSpec.from_dict(d),
                teacher=TeacherInfo.from_dict(d["teacher"]), codec=LabelCodec.from_dict(d["codec"]),
                manifest_blake2b=d["manifest_blake2b"], skipped=tuple(d.get("skipped", ())),
                labelling=None if d.get("labelling") is None else LabellingPlan.from_dict(d["labelling"]),
                imported_from=d.get("imported_from"),
                reencoded_from=None if d.get("reencoded_from") is None else LabelCodec.from_dict(d["reencoded_from"]),
                layout=d.get("layout", "block"),
                library_version=d.get("library_version", "unknown"),
                extra={k: v for k, v in d.items() if k not in known})
        except (TypeError, ValueError) as e:
            raise StoreError(f"the store attributes are not valid hald-store settings: {e}") from e

    def reencoded(self, codec: LabelCodec) -> "StoreSettings":
        """These settings with the labels re-encoded as ``codec``."""
        return replace(self, codec=codec, reencoded_from=self.codec, library_version=__version__)
