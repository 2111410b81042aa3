"""Importing reference (SRe2L / LPLD / HALD epoch_<e>.tar) soft labels into a batch-mode store:
label fidelity, exact replay with a real teacher, sizes, bad input, the CLI."""

from __future__ import annotations

import datetime
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hald_store import LabelStore, SoftLabelLoader, import_reference
from hald_store.build import batch_stats_teacher
from hald_store.cli import main
from hald_store.crop_plan import plan_crops
from hald_store.errors import HaldStoreError
from hald_store.images import scan_image_folder
from hald_store.loader import replay_epoch
from hald_store.relabel_files import SAMPLER_FILE, read_reference_epochs
from hald_store.testing import write_reference_epochs

from .conftest import agreeing, copy_subset, require_data

EPOCHS, BATCH, T = 2, 16, 20.0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """50 real CIFAR JPEGs: 10 classes x 5 (batches of 16 leave a short last batch of 2)."""
    return copy_subset(require_data("cifar10-mini", "train"), tmp_path_factory.mktemp("img") / "images",
                       classes=10, per_class=5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images, resnet56):
    """Reference files made by ResNet-56 with BatchNorm batch statistics and CutMix."""
    out = tmp_path_factory.mktemp("ref") / "labels"
    write_reference_epochs(images, out, resnet56, epochs=EPOCHS, batch_size=BATCH, temperature=T, input_size=32,
                           mix="cutmix", teacher_mode="train", seed=3)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory, reference, images):
    out = tmp_path_factory.mktemp("store") / "imported.zarr"
    summary = import_reference(reference, images, out, top_k=10, values="uint8", temperature=T, input_size=32,
                               progress=False)
    print(f"\n{summary}")  # the size before/after (visible with pytest -s)
    return LabelStore.open(out), summary


def _gap_bound(src: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |log p_store - log p_reference| for top-k = C, uint8 codes: the largest
    logit gap (the code scale) / 255 plus the fp16 rounding of the scale, times 2 / T."""
    p = src.double().clamp_min(2.0**-25)
    scale = T * (p.max(1).values.log() - p.min(1).values.log())
    return 2 * (scale / 255 + scale * 2.0**-10) / T


def test_reference_files_round_trip(reference, images):
    epochs, sampler = read_reference_epochs(reference)
    assert len(epochs) == EPOCHS and sorted(sampler) == list(range(EPOCHS))
    assert [b.size for b in epochs[0]] == [16, 16, 16, 2]
    assert all(b.mix_kind == "cutmix" and b.soft_label.dtype == torch.float16 for e in epochs for b in e)
    assert not np.array_equal(sampler[0], sampler[1])  # a shuffled order per epoch


def test_imported_labels_match_the_reference(imported, reference, images):
    store, summary = imported
    epochs, sampler = read_reference_epochs(reference)
    m = scan_image_folder(images, progress=False)
    assert store.batch_mode and store.crops_per_image == EPOCHS and store.num_classes == 10
    assert store.attrs["labelling"]["mix"] == "cutmix" and store.attrs["labelling"]["batch_size"] == BATCH
    assert store.attrs["teacher"] == {"name": "imported", "weights_sha256": None, "mode": "train"}
    worst = 0.0
    for e, batches in enumerate(epochs):
        # the integer windows and flips are exactly the ones the reference cropped
        boxes, flips = plan_crops(3, np.arange(len(m)), e, m.heights, m.widths)
        assert np.array_equal(store.array("crops/box")[:, e], boxes)
        assert np.array_equal(store.array("crops/flip")[:, e], flips)
        plan = store.batches(e)
        for b, batch in enumerate(batches):
            ids = sampler[e][b * BATCH : b * BATCH + batch.size]
            assert np.array_equal(plan["members"][b][: batch.size], ids)
            assert np.array_equal(plan["perm"][b][: batch.size], batch.mix_index)
            bbx1, bby1, bbx2, bby2 = batch.mix_bbox
            assert plan["box"][b].tolist() == [bbx1, bbx2, bby1, bby2]
            assert plan["lam"][b] == pytest.approx(batch.mix_lam)
            src = batch.soft_label.float()
            dec = store.soft_labels(ids, np.full(len(ids), e))
            assert torch.equal(dec.argmax(1), src.argmax(1))  # top-1 kept
            norm = src / src.sum(1, keepdim=True)
            assert (norm - src).abs().max() < 2e-3  # fp16 rows sum to 1 up to rounding
            bound = norm.double() * torch.expm1(_gap_bound(src))[:, None] + 1e-6
            assert ((dec.double() - norm.double()).abs() <= bound).all()
            worst = max(worst, float((dec - src).abs().max()))
    assert worst < 5e-3 and summary.max_prob_error == pytest.approx(worst, abs=1e-6)
    assert summary.top1_agreement == 1.0


def test_replay_of_the_imported_store_reproduces_the_labels(imported, images, resnet56):
    """The teacher, in the same mode, on the replayed (re-rendered, re-mixed) batches agrees with
    the imported top-1 on >= 99% of crops."""
    store, _ = imported
    teacher = batch_stats_teacher(resnet56)
    loader = SoftLabelLoader(store, images, batch_size=BATCH, backend="torchvision", seed=1)
    assert loader.replay and len(loader) == 4
    agree = total = 0
    for epoch in range(EPOCHS):
        plan = store.batches(replay_epoch(EPOCHS, epoch, seed=1))
        for b, batch in zip(loader.batch_order(epoch), loader.iter_epoch(epoch)):
            members = plan["members"][b]
            assert torch.equal(batch.image_ids, torch.from_numpy(members[members >= 0]))
            agree += agreeing(teacher, batch)
            total += len(batch.images)
    assert total == 100 and agree / total >= 0.99, agree / total


def test_sizes_are_reported(imported, reference):
    store, summary = imported
    files = sum(f.stat().st_size for f in reference.glob("epoch_*.tar"))
    assert summary.source_bytes == files and summary.sampler_bytes == (reference / SAMPLER_FILE).stat().st_size
    assert summary.label_bytes_on_disk == store.bytes_on_disk("labels") < files
    assert summary.bytes_on_disk == store.bytes_on_disk()
    text = str(summary)
    assert f"{files:,} bytes in {EPOCHS} epoch files" in text
    assert f"{summary.label_ratio:.1f}x smaller (labels)" in text
    assert math.isclose(summary.label_ratio, files / summary.label_bytes_on_disk)
    assert math.isclose(summary.total_ratio, files / summary.bytes_on_disk)
    whole = f"{summary.total_ratio:.1f}x smaller" if summary.total_ratio >= 1 else f"{1 / summary.total_ratio:.1f}x larger"
    assert f"{whole} (whole store)" in text


def test_mixup_without_sampler_file(tmp_path, images, resnet56):
    """No sampler file: every epoch visits images 0..N-1; MixUp (no bbox) is inferred."""
    ref = tmp_path / "labels"
    write_reference_epochs(images, ref, resnet56, epochs=1, batch_size=25, input_size=32, mix="mixup",
                           teacher_mode="eval", with_sampler_indices=False)
    assert not (ref / SAMPLER_FILE).exists()
    summary = import_reference(ref, images, tmp_path / "s.zarr", top_k=3, values="uint4", input_size=32,
                               teacher_mode="eval", progress=False)
    store = LabelStore.open(tmp_path / "s.zarr")
    assert summary.mix == "mixup" and store.attrs["labelling"]["mix"] == "mixup"
    assert np.array_equal(store.batches(0)["members"].ravel(), np.arange(50))
    assert (store.batches(0)["box"] == 0).all()
    (epoch,), _ = read_reference_epochs(ref)
    src = torch.cat([b.soft_label.float() for b in epoch])
    assert torch.equal(store.soft_labels(np.arange(50), np.zeros(50, dtype=int)).argmax(1), src.argmax(1))
    with pytest.raises(HaldStoreError, match="has no mix_bbox .a MixUp entry. but mix='cutmix'"):
        import_reference(ref, images, tmp_path / "c.zarr", mix="cutmix", input_size=32, progress=False)
    fewer = copy_subset(images, tmp_path / "fewer", classes=10, per_class=4)
    with pytest.raises(HaldStoreError, match="epoch_0.tar labels 50 images but .* holds 40 images"):
        import_reference(ref, fewer, tmp_path / "f.zarr", input_size=32, progress=False)


def _copy(reference, tmp_path):
    dst = tmp_path / "labels"
    shutil.copytree(reference, dst)
    return dst


def test_bad_reference_input(reference, images, tmp_path):
    out = tmp_path / "out.zarr"

    def fails(labels, match, root=images, **kw):
        kw = {"input_size": 32, "progress": False, **kw}
        with pytest.raises(HaldStoreError, match=match):
            import_reference(labels, root, out, **kw)
        assert not out.exists() and not list(tmp_path.glob(".hald-*"))

    # a gap in the epoch numbers
    gap = _copy(reference, tmp_path / "gap")
    (gap / "epoch_1.tar").rename(gap / "epoch_2.tar")
    fails(gap, r"missing epoch_1\.tar .*numbered 0\.\.2 without gaps")
    # the last epoch file is gone (the sampler file still lists its order)
    last = _copy(reference, tmp_path / "last")
    (last / "epoch_1.tar").unlink()
    fails(last, r"missing epoch_1\.tar")
    # a truncated file
    cut = _copy(reference, tmp_path / "cut")
    data = (cut / "epoch_1.tar").read_bytes()
    (cut / "epoch_1.tar").write_bytes(data[: len(data) // 2])
    fails(cut, r"epoch_1\.tar.*truncated or corrupt")
    # label width vs --num-classes
    fails(reference, r"epoch_0\.tar' batch 0: soft labels have 10 classes, expected 12", num_classes=12)
    # fewer images than the indices need
    fewer = copy_subset(images, tmp_path / "fewer", classes=10, per_class=4)
    fails(reference, r"need at least 50 images, but .* holds 40", root=fewer)
    # a CutMix box larger than the crops: wrong --input-size
    fails(reference, r"mix_bbox .* reaches beyond the 8x8 crops; pass the input_size", input_size=8)
    # the files record a mix
    fails(reference, r"records a mix .* but mix='none'", mix="none")
    # a batch entry of the wrong shape
    bad = _copy(reference, tmp_path / "shape")
    entries = torch.load(bad / "epoch_0.tar", weights_only=True)
    entries[2][0] = entries[2][0][:, :3]
    torch.save(entries, bad / "epoch_0.tar")
    with pytest.raises(HaldStoreError, match=r"epoch_0\.tar' batch 2: coords must have shape \(batch, 4\)"):
        read_reference_epochs(bad)
    entries[2] = entries[2][:5]
    torch.save(entries, bad / "epoch_0.tar")
    with pytest.raises(HaldStoreError, match=r"epoch_0\.tar' batch 2: expected an entry .*a list of length 5"):
        read_reference_epochs(bad)


def test_numpy_values_as_the_reference_saves_them(reference, tmp_path):
    """The reference stores np.random.beta / np.clip results (NumPy scalars); they load under
    torch.load(weights_only=True), arbitrary pickled objects do not."""
    labels = _copy(reference, tmp_path / "np")
    entries = torch.load(labels / "epoch_0.tar", weights_only=True)
    for entry in entries:
        entry[3] = np.float64(entry[3])
        entry[4] = [np.int64(v) for v in entry[4]]
    torch.save(entries, labels / "epoch_0.tar")
    (epoch, _), _ = read_reference_epochs(labels)
    assert isinstance(epoch[0].mix_lam, float) and epoch[0].mix_bbox.dtype == np.int64
    entries[0][3] = datetime.date(2024, 1, 1)
    torch.save(entries, labels / "epoch_0.tar")
    with pytest.raises(HaldStoreError, match="refusing to unpickle it"):
        read_reference_epochs(labels)


def test_output_handling(reference, images, imported, tmp_path):
    store, _ = imported
    with pytest.raises(HaldStoreError, match="already exists; pass overwrite=True"):
        import_reference(reference, images, store.path, input_size=32, progress=False)
    not_a_store = tmp_path / "notes"
    not_a_store.mkdir()
    (not_a_store / "keep.txt").write_text("mine")
    with pytest.raises(HaldStoreError, match="overwrite=True refuses to replace"):
        import_reference(reference, images, not_a_store, input_size=32, overwrite=True, progress=False)
    assert (not_a_store / "keep.txt").read_text() == "mine"
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store.path, copy)
    import_reference(reference, images, copy, top_k=2, input_size=32, overwrite=True, progress=False)
    assert LabelStore.open(copy).codec.top_k == 2


def test_cli_import(reference, images, tmp_path):
    out = tmp_path / "cli.zarr"
    r = CliRunner().invoke(main, ["import", str(reference), str(images), str(out), "--input-size", "32",
                                  "--top-k", "10", "--temperature", str(T), "-q"])
    assert r.exit_code == 0, r.output
    assert "size ratio" in r.output and "x smaller (labels)" in r.output
    store = LabelStore.open(out)
    assert store.batch_mode and store.codec.top_k == 10 and store.attrs["labelling"]["mix"] == "cutmix"
    r = CliRunner().invoke(main, ["import", str(reference), str(images), str(tmp_path / "x.zarr"), "--input-size",
                                  "32", "--num-classes", "12", "-q"])
    assert r.exit_code == 1 and "Error:" in r.output and "soft labels have 10 classes, expected 12" in r.output


def _resized_copy(src: Path, dst: Path, sizes: list[tuple[int, int]]) -> Path:
    """Real CIFAR photos (3 classes x 4) resized to the given (height, width) sizes, in turn."""
    copy_subset(src, dst, classes=3, per_class=4)
    for i, f in enumerate(sorted(dst.rglob("*.jpg"))):
        h, w = sizes[i % len(sizes)]
        with Image.open(f) as im:
            im.convert("RGB").resize((w, h), Image.BICUBIC).save(f, quality=90)
    return dst


@pytest.mark.parametrize("sizes", [[(224, 224)], [(375, 500), (301, 227), (333, 1001)]], ids=["224px", "odd"])
def test_float16_coords_as_the_reference_saves_them(tmp_path, resnet56, sizes):
    """The reference saves coords with `.half()`: `coords * 224` is up to ~0.06 px off a whole
    pixel. Import recovers the exact integer windows within float16's rounding."""
    root = _resized_copy(require_data("cifar10-mini", "train"), tmp_path / "images", sizes)
    labels = tmp_path / "labels"
    write_reference_epochs(root, labels, resnet56, epochs=3, batch_size=4, temperature=T, input_size=32,
                           mix="cutmix", teacher_mode="train", seed=5)
    entries = torch.load(labels / "epoch_0.tar", weights_only=True)
    assert entries[0][0].dtype == torch.float16
    manifest = scan_image_folder(root, progress=False)
    (epochs, sampler) = read_reference_epochs(labels)
    worst = 0.0
    for e, batches in enumerate(epochs):
        order = sampler[e].numpy() if isinstance(sampler[e], torch.Tensor) else sampler[e]
        hw = np.stack([manifest.heights, manifest.widths] * 2, axis=1)[order].astype(np.float64)
        scaled = np.concatenate([b.coords for b in batches]) * hw
        worst = max(worst, float(np.abs(scaled - np.rint(scaled)).max()))
    assert worst > 0.02  # beyond the old fixed tolerance: this used to be refused
    out = tmp_path / "s.zarr"
    import_reference(labels, root, out, top_k=10, temperature=T, input_size=32, progress=False)
    store = LabelStore.open(out)
    n = store.num_images
    for e in range(3):
        boxes, flips = plan_crops(5, np.arange(n), e, manifest.heights, manifest.widths)
        np.testing.assert_array_equal(store.array("crops/box")[:, e], boxes, err_msg=f"epoch {e}")
        np.testing.assert_array_equal(store.array("crops/flip")[:, e], flips)


def test_sre2l_per_batch_layout_is_explained(tmp_path, reference):
    """SRe2L's epoch_<e>/batch_<b>.tar holds logits and no image order: refused, saying why."""
    entries = torch.load(reference / "epoch_0.tar", weights_only=True)
    (tmp_path / "fkd" / "epoch_0").mkdir(parents=True)
    for b, entry in enumerate(entries):
        torch.save(entry, tmp_path / "fkd" / "epoch_0" / f"batch_{b}.tar")
    with pytest.raises(HaldStoreError, match=r"per-batch layout .* do not record which images each batch holds"):
        read_reference_epochs(tmp_path / "fkd")
