"""Building stores from real images with real teachers: round trip, resume, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from hald_store import LabelStore, build_store
from hald_store.cli import main
from hald_store.errors import (HaldStoreError, ImageError, ManifestMismatchError, ModelError, SettingsMismatchError,
                               StoreError, TeacherOutputError)
from hald_store.models import load_checkpoint, resolve_model
from hald_store.render import make_renderer, read_files

from .conftest import (SMALL, NaNTeacher, assert_stores_equal, copy_subset, generated_images, kill_after_blocks,
                       random_teacher, require_data, run_cli)

def test_round_trip_matches_teacher(small_set, tmp_path):
    small_folder, resnet20 = small_set.folder, small_set.teacher
    out = tmp_path / "s.zarr"
    summary = build_store(small_folder, out, resnet20, **SMALL)  # the teacher's name comes from resolve_model
    assert summary.crops_total == summary.crops_written == 24 * 4
    store = LabelStore.open(out)
    assert store.num_images == 24 and store.crops_per_image == 4 and store.complete
    assert store.class_names == small_set.class_names
    np.testing.assert_array_equal(store.hard_labels(), np.repeat([0, 1, 2], 8))

    # Re-render the stored windows independently and re-run the teacher: labels match the codec's encoding.
    img, seeds = np.repeat(np.arange(24), 4), np.tile(np.arange(4), 24)
    boxes, flips = store.boxes(img, seeds)
    paths = store.manifest().paths
    x = make_renderer("torchvision", size=32)(read_files([small_folder / paths[i] for i in img]), boxes, flips)
    with torch.inference_mode():  # build_store ran the teacher on the default device (CUDA where present)
        logits = resnet20.eval()(x.to(next(resnet20.parameters()).device)).cpu()
    expected = store.codec.encode(logits)
    got = store.read_fields(img, seeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    labels = store.read(img, seeds)
    assert torch.equal(labels.indices[:, 0], logits.argmax(1))
    dense = store.soft_labels(img, seeds, temperature=4.0)
    assert dense.shape == (96, 10) and torch.allclose(dense.sum(1), torch.ones(96), atol=1e-5)
    # Attributes say how it was made.
    a = store.attrs
    assert a["teacher"]["name"] == "cifar_resnet20" and a["plan_seed"] == 0 and a["input_size"] == 32
    assert a["codec"]["name"] == "uint8" and a["renderer"]["backend"] == "torchvision"


def test_rebuild_is_identical_and_resume_of_complete_store_is_noop(small_set, tmp_path):
    small_folder, resnet20 = small_set.folder, small_set.teacher
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    build_store(small_folder, a, resnet20, **SMALL)
    build_store(small_folder, b, resnet20, **SMALL)
    assert_stores_equal(a, b)
    again = build_store(small_folder, a, resnet20, resume=True, **SMALL)
    assert again.crops_written == 0 and again.blocks_skipped == 3


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory, cifar_mini_train):
    """The issue's acceptance build: cifar10-mini/train, ResNet-56, 8 crops, top-5, 8-bit, via the CLI."""
    ckpt = require_data("teachers", "cifar10-resnet56.th")
    out = tmp_path_factory.mktemp("mini") / "mini.zarr"
    result = CliRunner().invoke(main, [
        "build", str(cifar_mini_train), str(out), "--teacher", "cifar_resnet56", "--checkpoint", str(ckpt),
        "--crops-per-image", "8", "--top-k", "5", "--values", "uint8", "--input-size", "32", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "crops written    4,000" in result.output
    return out, ckpt


@pytest.mark.parametrize("backend,workers", [("dali", 1), ("dali", 3), ("pillow", 1), ("torchvision", 0),
                                            ("torchvision", 2)])
def test_thread_and_worker_counts_and_cache_give_the_same_store(small_folder, tmp_path, resnet20, backend, workers):
    """Rendering threads (DALI, pillow), worker processes (torchvision) and the decoded-image cache
    change the speed only: the store is bit-identical to a default build with that backend."""
    kw = {**SMALL, "backend": backend}
    ref = tmp_path / "ref.zarr"
    build_store(small_folder, ref, resnet20, cache_decoded=False, **kw)
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, workers=workers, cache_decoded=workers % 2 == 1, **kw)
    assert_stores_equal(ref, out)
    assert LabelStore.open(out).render_spec.backend == backend


def test_scan_once_then_build_from_the_manifest(small_folder, tmp_path, resnet20):
    manifest = tmp_path / "scan.npz"
    r = run_cli("scan", str(small_folder), str(manifest), "-q")
    assert r.exit_code == 0 and "24 images in 3 classes (0 skipped)" in r.output
    scanned, reused = tmp_path / "a.zarr", tmp_path / "b.zarr"
    first = build_store(small_folder, scanned, resnet20, **SMALL)
    again = build_store(small_folder, reused, resnet20, manifest=manifest, **SMALL)
    assert first.images_scanned == 24 and again.images_scanned == 0
    assert_stores_equal(scanned, reused)
    (tmp_path / "junk.npz").write_bytes(b"not a manifest")
    r = run_cli("build", str(small_folder), str(tmp_path / "c.zarr"), "--teacher", "cifar_resnet20", "-s", "2", "--random-init",
                "--top-k", "3", "--manifest", str(tmp_path / "junk.npz"))  # top-k 5 of 3 classes fails first
    assert r.exit_code == 1 and "junk.npz' is not a manifest written by 'hald-store scan'" in r.output
    next(small_folder.rglob("*.jpg")).unlink()
    with pytest.raises(ManifestMismatchError, match="1 missing"):
        build_store(small_folder, tmp_path / "d.zarr", resnet20, manifest=manifest, **SMALL)


def test_cli_info_json(mini_store):
    out, _ = mini_store
    result = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["num_images"] == 500 and info["crops_per_image"] == 8 and info["num_crops"] == 4000
    assert info["num_classes"] == 10 and info["top_k"] == 5 and info["values"] == "uint8"
    assert info["temperature"] == 20.0 and info["complete"]
    assert 0 < info["bytes_per_crop"] < 20 * 2  # well under the 20-byte fp16 reference vector... plus metadata
    assert CliRunner().invoke(main, ["info", str(out)]).exit_code == 0


def test_cli_verify_passes(mini_store, cifar_mini_train):
    out, ckpt = mini_store
    result = CliRunner().invoke(main, ["verify", str(out), str(cifar_mini_train), "--deep", "--teacher", "cifar_resnet56",
                                       "--checkpoint", str(ckpt), "--sample", "4000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["top1_agreement"] >= 0.99 and report["num_crops"] == 4000


def test_verify_fails_against_other_teacher(mini_store, cifar_mini_train):
    out, _ = mini_store
    ckpt20 = require_data("teachers", "cifar10-resnet20.th")
    result = CliRunner().invoke(main, ["verify", str(out), str(cifar_mini_train), "--deep", "--teacher", "cifar_resnet20",
                                       "--checkpoint", str(ckpt20), "--sample", "200"])
    assert result.exit_code == 1 and "FAIL" in result.output


@pytest.mark.parametrize("data", ["generated", "cifar10-mini"])
def test_kill_9_then_resume_gives_identical_store(tmp_path, data):
    if data == "generated":  # a seeded random ResNet-20 saved as the checkpoint
        images, teacher = generated_images(tmp_path / "gen", classes=10, per_class=8), "cifar_resnet20"
        ckpt = tmp_path / "random-resnet20.pt"
        torch.save(random_teacher().state_dict(), ckpt)
    else:
        images, teacher = copy_subset(require_data("cifar10-mini", "train"), tmp_path / "images", 10, 8), "cifar_resnet56"
        ckpt = require_data("teachers", "cifar10-resnet56.th")
    args = [str(images), None, "--teacher", teacher, "--checkpoint", str(ckpt), "-s", "16", "--top-k", "4",
            "--values", "uint4", "--input-size", "32", "--chunk-images", "4", "--batch-size", "16", "--quiet"]
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    cmd = [sys.executable, "-m", "hald_store", "build"]
    kill_after_blocks(cmd + [args[0], str(killed), *args[2:]], killed)
    done_before = LabelStore.open(killed, allow_incomplete=True).block_done()
    assert 0 < done_before.sum() < len(done_before)
    with pytest.raises(StoreError, match="incomplete"):
        LabelStore.open(killed)

    resumed = subprocess.run(cmd + [args[0], str(killed), *args[2:], "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{int(done_before.sum())} already done" in resumed.stdout
    subprocess.run(cmd + [args[0], str(whole), *args[2:]], check=True, capture_output=True)
    assert_stores_equal(killed, whole)


# ------------------------------------------------------------------ bad input
def test_missing_and_empty_image_folder(tmp_path, resnet20):
    with pytest.raises(ImageError, match="does not exist"):
        build_store(tmp_path / "nope", tmp_path / "s.zarr", resnet20, **SMALL)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ImageError, match="holds no images"):
        build_store(tmp_path / "empty", tmp_path / "s.zarr", resnet20, **SMALL)
    (tmp_path / "flat").mkdir()
    with pytest.raises(ImageError, match="no class sub-folders"):
        build_store(tmp_path / "flat", tmp_path / "s.zarr", resnet20, **SMALL)
    assert not (tmp_path / "s.zarr").exists()


def test_corrupt_image_is_named_and_skip_bad_records_it(small_folder, tmp_path, resnet20):
    bad = small_folder / "bird" / "0003.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated JPEG
    (small_folder / "bird" / "zz.png").write_bytes(b"not an image at all")
    out = tmp_path / "s.zarr"
    with pytest.raises(ImageError, match="0003.jpg"):
        build_store(small_folder, out, resnet20, **SMALL)
    assert not out.exists()
    build_store(small_folder, out, resnet20, skip_bad=True, **SMALL)
    store = LabelStore.open(out)
    assert store.num_images == 23
    assert sorted(s["path"] for s in store.attrs["skipped"]) == ["bird/0003.jpg", "bird/zz.png"]
    assert "bird/0003.jpg" not in store.manifest().paths


def test_unknown_teacher_and_bad_checkpoint(small_folder, tmp_path):
    r = run_cli("build", str(small_folder), str(tmp_path / "s.zarr"), "--teacher", "no_such_net", "-s", "2")
    assert r.exit_code == 1 and "unknown model 'no_such_net'" in r.output
    r = run_cli("build", str(small_folder), str(tmp_path / "s.zarr"), "--teacher", "nomodule_xyz:make", "-s", "2")
    assert r.exit_code == 1 and "cannot import module 'nomodule_xyz'" in r.output
    ckpt56 = require_data("teachers", "cifar10-resnet56.th")
    with pytest.raises(ModelError, match="does not fit the model: unexpected keys"):
        load_checkpoint(resolve_model("cifar_resnet20", 10), ckpt56)
    r = run_cli("build", str(small_folder), str(tmp_path / "s.zarr"), "--teacher", "cifar_resnet20", "--checkpoint",
                str(ckpt56), "-s", "2")
    assert r.exit_code == 1 and "does not fit the model" in r.output
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        load_checkpoint(resolve_model("cifar_resnet20", 10), junk)
    assert not (tmp_path / "s.zarr").exists()


def test_bad_numbers(small_folder, tmp_path, resnet20):
    out = tmp_path / "s.zarr"
    with pytest.raises(HaldStoreError, match="top_k must be between 1 and num_classes=10, got 11"):
        build_store(small_folder, out, resnet20, **{**SMALL, "top_k": 11})
    with pytest.raises(HaldStoreError, match="exactly one of crops_per_image and slc"):
        build_store(small_folder, out, resnet20, **{**SMALL, "crops_per_image": None})
    with pytest.raises(HaldStoreError, match="slc=12 is not a positive multiple of the 8 images per class"):
        build_store(small_folder, out, resnet20, **{**SMALL, "crops_per_image": None}, slc=12)
    with pytest.raises(TeacherOutputError, match="teacher produced 10 outputs per crop but the label codec expects num_classes=3"):
        build_store(small_folder, out, resnet20, **{**SMALL, "num_classes": None})  # 10-way teacher, 3 folders
    r = run_cli("build", str(small_folder), str(out), "--teacher", "cifar_resnet20", "-s", "2", "--scale", "0.5", "0.1")
    assert r.exit_code == 2 and "scale" in r.output
    # the CLI names flags where the library names parameters
    cli = ["build", str(small_folder), str(out), "--teacher", "cifar_resnet20", "--random-init", "--num-classes", "10"]
    for extra, message in ((["-s", "2", "--slc", "8"], "give exactly one of --crops-per-image and --slc"),
                           (["-s", "0"], "--crops-per-image must be >= 1, got 0"),
                           (["-s", "1", "--mix-alpha", "2"], "--mix-alpha needs --mix cutmix or --mix mixup (it has no "
                                                             "effect with --mix none)"),
                           (["-s", "1", "--top-k", "11"], "--top-k must be between 1 and --num-classes 10, got 11")):
        r = run_cli(*cli, *extra)
        assert r.exit_code == 1 and f"Error: {message}" in r.output, (extra, r.output)
    assert not out.exists()


def test_existing_output_needs_resume_or_overwrite(small_folder, tmp_path, resnet20):
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    before = LabelStore.open(out).read_fields(np.arange(24), 0)
    with pytest.raises(StoreError, match="already exists; pass resume=True"):
        build_store(small_folder, out, resnet20, **SMALL)
    with pytest.raises(SettingsMismatchError, match=r"crops_per_image: 4 -> 5"):
        build_store(small_folder, out, resnet20, resume=True, **{**SMALL, "crops_per_image": 5})
    with pytest.raises(SettingsMismatchError, match="codec"):
        build_store(small_folder, out, resnet20, resume=True, **{**SMALL, "values": "fp16"})
    after = LabelStore.open(out).read_fields(np.arange(24), 0)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    # Overwrite replaces a store but never an unrelated directory.
    build_store(small_folder, out, resnet20, overwrite=True, **{**SMALL, "crops_per_image": 2})
    assert LabelStore.open(out).crops_per_image == 2
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(StoreError, match="overwrite=True refuses to replace"):
        build_store(small_folder, other, resnet20, overwrite=True, **SMALL)
    assert (other / "thesis.tex").exists()


def test_resume_with_changed_images_is_refused(small_folder, tmp_path, resnet20):
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    (small_folder / "bird" / "0000.jpg").unlink()
    with pytest.raises(ManifestMismatchError, match="differ from the ones it was built from"):
        build_store(small_folder, out, resnet20, resume=True, **SMALL)
    with pytest.raises(ManifestMismatchError, match=r"1 missing \(bird/0000.jpg\)"):
        LabelStore.open(out).check_images(small_folder)


def test_nan_teacher_names_images_and_keeps_finished_blocks(small_folder, tmp_path, resnet20):
    out = tmp_path / "s.zarr"
    with pytest.raises(TeacherOutputError, match="NaN/Inf .*jpg"):
        build_store(small_folder, out, NaNTeacher(resnet20, bright_from=-10.0), **SMALL)
    assert not out.exists()  # caught by the probe before anything was written
    # A teacher that breaks mid-build keeps the blocks finished before.
    flaky = NaNTeacher(resnet20, bright_from=0.6)
    with pytest.raises(TeacherOutputError, match="finished blocks are kept"):
        build_store(small_folder, out, flaky, **SMALL)


def test_unknown_format_version_and_non_store(tmp_path, small_folder, resnet20):
    out = tmp_path / "s.zarr"
    build_store(small_folder, out, resnet20, **SMALL)
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["hald_store"] = {**g.attrs["hald_store"], "format_version": 99}
    with pytest.raises(StoreError, match="format version 99; this hald-store reads versions 1, 2"):
        LabelStore.open(out)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a hald-store store"):
        LabelStore.open(tmp_path / "plain.zarr")
    r = run_cli("info", str(tmp_path / "missing.zarr"))
    assert r.exit_code == 1 and "does not exist" in r.output


def test_convert_reencodes_labels_and_keeps_crops(tmp_path, small_folder, resnet20):
    full = tmp_path / "full.zarr"
    build_store(small_folder, full, resnet20, num_classes=10, crops_per_image=3, top_k=10, values="fp32",
                input_size=32, progress=False)
    direct = tmp_path / "direct.zarr"
    build_store(small_folder, direct, resnet20, num_classes=10, crops_per_image=3, top_k=4, values="uint8",
                input_size=32, progress=False)
    r = CliRunner().invoke(main, ["convert", str(full), str(tmp_path / "conv.zarr"), "--top-k", "4",
                                  "--values", "uint8", "-q"])
    assert r.exit_code == 0, r.output
    assert "label bytes" in r.output and "B/crop" in r.output
    conv, ref = LabelStore.open(tmp_path / "conv.zarr"), LabelStore.open(direct)
    assert conv.attrs["codec"] == ref.attrs["codec"] and conv.attrs["reencoded_from"]["name"] == "fp32"
    assert np.array_equal(conv.array("crops/box")[:], ref.array("crops/box")[:])
    i, s = np.divmod(np.arange(conv.num_crops), 3)
    a, b = conv.read(i, s), ref.read(i, s)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.probs(20.0), b.probs(20.0), atol=1e-3)
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "conv.zarr"), str(tmp_path / "x.zarr"), "--top-k", "5",
                                  "--values", "uint8"])
    assert r.exit_code == 1 and "--top-k 5 exceeds the 4 classes per crop the source store keeps" in r.output
    r = CliRunner().invoke(main, ["convert", str(full), str(direct), "--top-k", "4", "--values", "uint8"])
    assert r.exit_code == 1 and "exists" in r.output and LabelStore.open(direct).complete


def test_rough_edges_are_one_line_errors(small_folder, tmp_path):
    ckpt = require_data("teachers", "cifar10-resnet20.th")
    out = tmp_path / "s.zarr"
    base = ["build", str(small_folder), str(out), "--teacher", "cifar_resnet20", "--num-classes", "10", "-s", "1",
            "--input-size", "32", "-q"]
    text = tmp_path / "notes.txt"
    text.write_text("epochs: 300\nlr: 0.1\n")
    for extra, code, message in (
        (["--checkpoint", str(ckpt), "--temperature", "inf"], 1, "--temperature must be a finite number > 0, got inf"),
        (["--checkpoint", str(ckpt), "--device", "tpu"], 1, "--device tpu: not a device; use auto, cpu, cuda"),
        (["--checkpoint", str(ckpt), "--device", "meta"], 1, "--device meta: unsupported device type 'meta'"),
        (["--checkpoint", str(text)], 1, "cannot be read as a PyTorch checkpoint (a torch.save file); it looks like a "
                                         "text file"),
        ([], 2, "no --checkpoint: teacher 'cifar_resnet20' would label with random weights"),
        (["--checkpoint", str(ckpt), "--random-init"], 2, "--checkpoint and --random-init contradict each other"),
    ):
        r = run_cli(*base, *extra)
        assert r.exit_code == code and message in r.output, (extra, r.output)
        assert isinstance(r.exception, SystemExit) and not out.exists()
    r = run_cli(*base, "--random-init")
    assert r.exit_code == 0, r.output
    assert LabelStore.open(out).complete
