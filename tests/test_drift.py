"""Drift measured from real stores (real CIFAR images, the pretrained CIFAR ResNet-20 teacher)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from hald_store import CropPolicy, LabelStore, build_store
from hald_store.cli import main
from hald_store.drift import S1_NOTE, measure_drift, write_drift
from hald_store.errors import ImageError, StoreError

from .conftest import copy_subset, require_data

SMALL = dict(num_classes=10, top_k=3, values="uint8", input_size=32, batch_size=64, chunk_images=8,
             backend="torchvision", progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 real CIFAR JPEGs: 3 classes x 8 images."""
    return copy_subset(require_data("cifar10-mini", "train"), tmp_path_factory.mktemp("drift") / "images", 3, 8)


@pytest.fixture(scope="module")
def store(images, resnet20) -> LabelStore:
    """S = 6 crops per image in chunks of 8 images (3 chunks)."""
    out = images.parent / "s6.zarr"
    build_store(images, out, resnet20, crops_per_image=6, **SMALL)
    return LabelStore.open(out)


def direct(store: LabelStore, t: float) -> tuple[np.ndarray, ...]:
    """The statistics computed plainly: dense probabilities, np.cov per image, argmax, bincount."""
    n, s = store.num_images, store.crops_per_image
    p = store.soft_labels(np.repeat(np.arange(n), s), np.tile(np.arange(s), n), t).double().numpy().reshape(n, s, -1)
    tr = np.array([np.trace(np.cov(p[i].T, ddof=1)) for i in range(n)])
    top1 = p.argmax(2)
    labels = store.hard_labels()
    off_class = (top1 != labels[:, None]).mean(1)
    counts = np.stack([np.bincount(row, minlength=p.shape[2]) for row in top1])
    crop_dist = ((p - p.mean(1, keepdims=True)) ** 2).sum(2)
    return tr, off_class, 1 - counts.max(1) / s, counts.argmax(1), crop_dist


@pytest.mark.parametrize("t", [None, 1.0])
def test_statistics_equal_a_direct_computation(store, t):
    report = measure_drift(store.path, temperature=t, top=5, progress=False)
    temp = store.temperature if t is None else t
    tr, off_class, off_majority, majority, crop_dist = direct(store, temp)
    assert report.temperature == temp
    np.testing.assert_allclose(report.tr_cov, tr, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(report.off_class, off_class)
    np.testing.assert_array_equal(report.off_majority, off_majority)
    np.testing.assert_array_equal(report.majority, majority)
    best = np.argsort(-crop_dist.ravel(), kind="stable")[:5]
    np.testing.assert_array_equal(report.top_crops[:, 0] * store.crops_per_image + report.top_crops[:, 1], best)
    np.testing.assert_allclose(report.top_crops[:, 2], crop_dist.ravel()[best], rtol=1e-5)
    labels = store.hard_labels()
    summary = report.summary()
    for c, name in enumerate(store.class_names):
        v = tr[labels == c]
        got = summary["per_class"][name]
        assert got["images"] == len(v) == 8
        np.testing.assert_allclose([got["tr_cov"][k] for k in ("mean", "median", "p90")],
                                   [v.mean(), np.median(v), np.quantile(v, 0.9)], rtol=1e-5)
    np.testing.assert_allclose(summary["overall"]["off_class"]["mean"], off_class.mean())


def planted(src: Path, dst: Path) -> Path:
    """The images of ``src`` with the left half replaced by the left half of the image at the same
    place in the next class: a distractor of another class in part of every frame (PNG, lossless)."""
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    for c, class_dir in enumerate(classes):
        other = sorted(classes[(c + 1) % len(classes)].iterdir())
        (dst / class_dir.name).mkdir(parents=True)
        for f, g in zip(sorted(class_dir.iterdir()), other):
            a, b = np.asarray(Image.open(f).convert("RGB")).copy(), np.asarray(Image.open(g).convert("RGB"))
            a[:, : a.shape[1] // 2] = b[:, : a.shape[1] // 2]
            Image.fromarray(a).save(dst / class_dir.name / f"{f.stem}.png")
    return dst


def lossless(src: Path, dst: Path) -> Path:
    """The images of ``src`` unchanged, as PNG (the same format as :func:`planted`)."""
    for f in sorted(src.rglob("*.jpg")):
        (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("RGB").save(dst / f.parent.name / f"{f.stem}.png")
    return dst


def test_planted_distractors_drift_more(images, resnet20, tmp_path):
    """Crops of 60-100% of the frame: the clean images' crops mostly agree; with another class in
    half of every frame they split between the two classes. (At T = 20 the planted teacher's logits
    are flatter and tr_cov does not separate the two stores; the top-1 shares do at any T.)"""
    clean, mixed = lossless(images, tmp_path / "clean"), planted(images, tmp_path / "planted")
    reports = {}
    for name, root in (("clean", clean), ("planted", mixed)):
        build_store(root, tmp_path / f"{name}.zarr", resnet20, crops_per_image=8,
                    crop_policy=CropPolicy(scale=(0.6, 1)), **SMALL)  # the same crop windows in both stores
        reports[name] = measure_drift(tmp_path / f"{name}.zarr", temperature=1.0, progress=False)
    a, b = reports["clean"], reports["planted"]
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.tr_cov.mean() > 1.15 * a.tr_cov.mean(), (a.tr_cov.mean(), b.tr_cov.mean())
    assert b.off_class.mean() > a.off_class.mean() + 0.3, (a.off_class.mean(), b.off_class.mean())
    assert b.off_majority.mean() > a.off_majority.mean(), (a.off_majority.mean(), b.off_majority.mean())


def test_one_crop_per_image_reports_top1_shares_only(images, resnet20, tmp_path):
    build_store(images, tmp_path / "s1.zarr", resnet20, crops_per_image=1, **SMALL)
    store = LabelStore.open(tmp_path / "s1.zarr")
    report = measure_drift(store, top=3, progress=False)
    assert report.tr_cov is None and report.notes == [S1_NOTE] and "tr_cov" not in report.summary()["overall"]
    assert "undefined" in str(report) and "S = 1" in str(report)
    probs = store.soft_labels(np.arange(store.num_images), 0).numpy()
    labels = store.hard_labels()
    np.testing.assert_array_equal(report.off_class, probs.argmax(1) != labels)
    assert (report.off_majority == 0).all()
    own = probs[np.arange(len(labels)), labels]
    np.testing.assert_array_equal(report.top_crops[:, 0], np.argsort(own, kind="stable")[:3])
    written = write_drift(report, tmp_path / "out", images)
    assert [p.name for p in written] == ["drift.json", "drift_per_image.csv", "drift_hist.png", "drift_gallery.png"]


def test_mixed_batch_specific_store_is_refused(images, resnet20, tmp_path):
    build_store(images, tmp_path / "mix.zarr", resnet20, crops_per_image=2, teacher_mode="train", mix="cutmix",
                labelling_batch_size=8, **SMALL)
    with pytest.raises(StoreError, match=r"mixed crops \(mix=cutmix\).*--mix none") as e:
        measure_drift(tmp_path / "mix.zarr", progress=False)
    assert "\n" not in str(e.value)


def test_cli_writes_summary_table_plots_and_gallery(store, images, tmp_path):
    out = tmp_path / "drift"
    result = CliRunner().invoke(main, ["drift", store.path, str(images), "--out", str(out), "-T", "2", "--top", "4",
                                       "-q"])
    assert result.exit_code == 0, result.output
    assert "tr_cov" in result.output and "drift_gallery.png" in result.output
    data = json.loads((out / "drift.json").read_text())
    assert data["temperature"] == 2.0 and data["num_images"] == 24 and len(data["top_crops"]) == 4
    assert set(data["per_class"]) == {"airplane", "automobile", "bird"}
    with open(out / "drift_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    report = measure_drift(store, temperature=2.0, top=4, progress=False)
    assert [r["path"] for r in rows] == store.manifest().paths
    np.testing.assert_allclose([float(r["tr_cov"]) for r in rows], report.tr_cov, rtol=1e-5)
    for png, size in (("drift_hist.png", None), ("drift_gallery.png", None)):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and min(im.size) > 100, size


def test_cli_bad_input_is_one_line(store, tmp_path):
    result = CliRunner().invoke(main, ["drift", store.path, "--out", str(tmp_path / "o"), "-T", "0"])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert "--temperature must be a finite number > 0, got 0.0" in result.output
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(main, ["drift", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_gallery_refuses_manifest_paths_outside_the_image_root(store, images, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store.path, copy)
    zarr.open_group(str(copy), mode="r+")["images/path"][0] = "../../outside.jpg"
    report = replace(measure_drift(copy, top=1, progress=False), top_crops=np.array([[0.0, 0.0, 1.0]]))
    with pytest.raises(ImageError, match=r"manifest path '../../outside.jpg' leaves the image root"):
        write_drift(report, tmp_path / "out", images)
    assert not (tmp_path / "out" / "drift_gallery.png").exists()
    assert (tmp_path / "out" / "drift.json").exists()  # what was written before stays
