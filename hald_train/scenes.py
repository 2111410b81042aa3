"""A small, deterministic, labelled shapes data set for the embedded demo (no downloads).

Every image is a scene: a textured background, one large MAIN object of the image's class
and one smaller DISTRACTOR object of another class, placed to overlap the main object
little. A random crop that catches only the distractor therefore genuinely looks like a
different class, which is what per-crop soft labels are meant to capture.

Layout (ImageFolder, class folders sort in class order)::

    root/train/00_circle/0000.jpg ...
    root/test/00_circle/0000.jpg ...
    root/objects.json   # parameters, class names, per-image classes and boxes

Every random number comes from ``np.random.default_rng([seed, split, class, index])``, so
output is bit-identical on every run on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from hald_store.errors import HaldStoreError

FORMAT_VERSION = 1
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliasing)
_MAX_ANGLE = 10.0  # degrees; with the 0.08 margin no shape corner leaves its cell
_M = 0.08
_STAR = [0.5 + (0.42 if k % 2 == 0 else 0.17) * f(k * math.pi / 5) * s
         for k in range(10) for f, s in ((math.sin, 1), (math.cos, -1))]
# Shape -> ImageDraw primitives in unit coordinates: (method, coordinates, fill).
_SPECS: dict[str, list[tuple[str, list[float], int]]] = {
    "circle": [("ellipse", [_M, _M, 1 - _M, 1 - _M], 255)],
    "square": [("rectangle", [0.14, 0.14, 0.86, 0.86], 255)],
    "triangle": [("polygon", [0.5, _M, 1 - _M, 0.86, _M, 0.86], 255)],
    "cross": [("rectangle", [_M, 0.36, 1 - _M, 0.64], 255), ("rectangle", [0.36, _M, 0.64, 1 - _M], 255)],
    "ring": [("ellipse", [_M, _M, 1 - _M, 1 - _M], 255), ("ellipse", [0.3, 0.3, 0.7, 0.7], 0)],
    "diamond": [("polygon", [0.5, _M, 1 - _M, 0.5, 0.5, 1 - _M, _M, 0.5], 255)],
    "star": [("polygon", _STAR, 255)],
    "hbar": [("rectangle", [_M, 0.36, 1 - _M, 0.64], 255)],
    "crescent": [("ellipse", [_M, _M, 1 - _M, 1 - _M], 255), ("ellipse", [0.32, 0.02, 0.98, 0.78], 0)],
    "frame": [("rectangle", [0.14, 0.14, 0.86, 0.86], 255), ("rectangle", [0.34, 0.34, 0.66, 0.66], 0)],
}
SHAPES: tuple[str, ...] = tuple(_SPECS)


def _shape_mask(shape: str, side: int, angle: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` drawn in a side x side cell, rotated."""
    n = side * _SUPERSAMPLE
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    for method, coords, fill in _SPECS[shape]:
        getattr(draw, method)([v * (n - 1) for v in coords], fill=fill)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.asarray(img.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour at distance >= 140 from every background colour (or the farthest of 16)."""
    candidates = rng.integers(0, 256, (16, 3)).astype(np.float32)
    dist = np.linalg.norm(candidates[:, None] - background[None], axis=-1).min(axis=1)
    ok = np.flatnonzero(dist >= 140)
    return candidates[ok[0] if ok.size else int(dist.argmax())]


def _scene(rng: np.random.Generator, size: int, cls: int, num_classes: int):
    """One image (uint8 HxWx3), its main box and the distractor's class and box."""
    ends = rng.integers(0, 256, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    t = x * math.cos(theta) + y * math.sin(theta)
    t = (t - t.min()) / (t.max() - t.min())
    img = ends[0] * (1 - t[..., None]) + ends[1] * t[..., None] + rng.normal(0, 8, (size, size, 3))

    other = int(rng.integers(num_classes - 1))
    other += other >= cls
    main_side = int(round(size * rng.uniform(0.45, 0.65)))
    dist_side = int(round(size * rng.uniform(0.22, 0.35)))
    main_box = [*(int(v) for v in rng.integers(0, size - main_side + 1, 2)), main_side, main_side]
    cand = rng.integers(0, size - dist_side + 1, (16, 2))  # least-overlap of 16 random spots
    overlap = [np.clip(np.minimum(cand[:, k] + dist_side, main_box[k] + main_side)
                       - np.maximum(cand[:, k], main_box[k]), 0, None) for k in (0, 1)]
    top, left = cand[int(np.argmin(overlap[0] * overlap[1]))]
    dist_box = [int(top), int(left), dist_side, dist_side]

    for shape_cls, (bt, bl, side, _) in ((cls, main_box), (other, dist_box)):
        colour = _contrasting_colour(rng, ends)
        alpha = _shape_mask(SHAPES[shape_cls], side, rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))[..., None]
        cell = img[bt:bt + side, bl:bl + side]
        img[bt:bt + side, bl:bl + side] = cell * (1 - alpha) + colour * alpha
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), main_box, other, dist_box


def _matches(root: Path, params: dict) -> bool:
    """True if ``root`` holds a complete set with ``params``; False if absent or an empty folder."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    try:
        if json.loads((root / "objects.json").read_text())["params"] == params:
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise HaldStoreError(
        f"{str(root)!r} already exists and does not hold a shapes data set generated with "
        f"{params}; choose another folder (nothing was changed)"
    )


def make_shapes_dataset(
    root: str | os.PathLike,
    *,
    num_classes: int = 6,
    train_per_class: int = 40,
    test_per_class: int = 20,
    size: int = 48,
    seed: int = 0,
    image_format: str = "jpeg",
    progress: bool = False,
) -> Path:
    """Write the shapes data set under ``root`` (atomically) and return ``root`` as a Path.

    A no-op if ``root`` already holds a set generated with the same parameters; raises
    :class:`HaldStoreError` if ``root`` holds anything else (it is never deleted).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes!r}")
    for name, value in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed!r}")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")

    root = Path(root)
    params = dict(version=FORMAT_VERSION, num_classes=num_classes, train_per_class=train_per_class,
                  test_per_class=test_per_class, size=size, seed=seed, image_format=image_format)
    if _matches(root, params):
        return root
    classes = [f"{c:02d}_{SHAPES[c]}" for c in range(num_classes)]
    ext, save_kw = (".jpg", {"quality": 95, "subsampling": 0}) if image_format == "jpeg" else (".png", {})
    splits = (("train", train_per_class), ("test", test_per_class))

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        objects: dict[str, list] = {}
        bar = tqdm(total=num_classes * (train_per_class + test_per_class), desc="shapes",
                   unit="img", disable=not progress, leave=False)
        for split_id, (split, per_class) in enumerate(splits):
            objects[split] = []
            for c, name in enumerate(classes):
                (tmp / split / name).mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, split_id, c, i])
                    pixels, main_box, other, dist_box = _scene(rng, size, c, num_classes)
                    rel = f"{name}/{i:04d}{ext}"
                    Image.fromarray(pixels).save(tmp / split / rel, **save_kw)
                    objects[split].append({"path": rel, "class": c, "box": main_box,
                                           "distractor_class": other, "distractor_box": dist_box})
                    bar.update()
        bar.close()
        meta = {"params": params, "classes": classes, "box_format": "top,left,height,width",
                "paths_relative_to": "root/<split>", "splits": objects}
        (tmp / "objects.json").write_text(json.dumps(meta, indent=1))
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        try:
            os.rename(tmp, root)
        except OSError:
            if not _matches(root, params):  # lost a race against a concurrent writer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
