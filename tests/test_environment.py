"""Environment failures (full disk, read-only file system, too many open files, out of memory,
a build too large for the machine): one line naming the path and what to do, nothing lost."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hald_store import LabelStore, build_store
from hald_store.cli import main
from hald_store.errors import environment_failure
from hald_train.cli import main as train_cli

from .conftest import SMALL, require_data


@pytest.fixture
def store(small_folder, tmp_path, resnet20) -> Path:
    build_store(small_folder, tmp_path / "s.zarr", resnet20, **SMALL)
    return tmp_path / "s.zarr"


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options)``: a fresh tmpfs of its own (root only), unmounted at the end."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def full_disk(tmpfs, free: int = 16 << 10) -> Path:
    """A 1 MiB file system with only ``free`` bytes left."""
    where = tmpfs("size=1m")
    with open(where / "filler", "wb") as f:
        f.write(b"\0" * ((1 << 20) - free))
    return where


def one_line_error(r, *words: str) -> None:
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    for w in words:
        assert w in r.output, r.output


def build_args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["build", str(images), str(out), "--teacher", "cifar_resnet20", "--checkpoint",
            str(require_data("teachers", "cifar10-resnet20.th")), "--num-classes", "10", "--input-size", "32", "--backend", "torchvision",
            "-q", *extra]


def test_build_refuses_up_front_what_cannot_fit_in_memory(small_folder, tmp_path):
    r = CliRunner().invoke(main, build_args(small_folder, tmp_path / "big.zarr", "-s", "1000000000"))
    one_line_error(r, "1,000,000,000 crops per image (--crops-per-image) need about", "GiB of memory", "lower --crops-per-image or "
                   "--chunk-images")
    assert not (tmp_path / "big.zarr").exists()


def test_build_refuses_up_front_what_cannot_fit_on_disk(small_folder, tmpfs):
    where = tmpfs("size=1m")
    r = CliRunner().invoke(main, build_args(small_folder, where / "s.zarr", "-s", "100000"))
    one_line_error(r, "100,000 crops per image (--crops-per-image) need about", "GiB on disk", f"{str(where)!r} has", "write elsewhere")
    assert not (where / "s.zarr").exists()


@pytest.mark.parametrize("seed", ["-1", "12345678901234567890"])
def test_build_seed_out_of_range_names_the_flag(small_folder, tmp_path, seed):
    r = CliRunner().invoke(main, build_args(small_folder, tmp_path / "s.zarr", "-s", "2", "--seed", seed))
    one_line_error(r, f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}")


def test_full_disk_is_one_line_and_a_build_resumes_elsewhere_intact(small_folder, tmpfs, tmp_path, store):
    disk = full_disk(tmpfs)
    r = CliRunner().invoke(main, build_args(small_folder, disk / "s.zarr", "-s", "4", "--top-k", "3",
                                            "--chunk-images", "8"))
    one_line_error(r, "no space left on the device of", "free space there or write to another disk")
    r = CliRunner().invoke(main, ["convert", str(store), str(disk / "c.zarr"), "--top-k", "2", "--values", "uint4",
                                  "-q"])
    one_line_error(r, "no space left on the device of", str(disk))
    assert [p.name for p in disk.iterdir() if p.name.startswith(".hald-store-")] == []  # convert cannot resume
    assert LabelStore.open(store).complete  # the source is untouched


@pytest.mark.parametrize("free", [4 << 10, 16 << 10])  # no room for the owner file / for a checkpoint
def test_full_disk_during_training_is_one_line(tmpfs, store, small_folder, free):
    disk = full_disk(tmpfs, free=free)
    r = CliRunner().invoke(train_cli, [str(store), str(small_folder), "--out", str(disk / "run"), "--schedule",
                                       "soft:1", "--batch-size", "8", "--backend", "torchvision", "-q"])
    one_line_error(r, "no space left on the device of", str(disk / "run"))
    assert not [p.name for p in (disk / "run").iterdir() if p.suffix == ".tmp"]


def test_read_only_file_system_is_one_line(tmpfs, store, small_folder):
    ro = tmpfs("size=1m,ro")
    for cli, args in ((main, build_args(small_folder, ro / "s.zarr", "-s", "2")),
                      (main, ["convert", str(store), str(ro / "c.zarr"), "--top-k", "2", "--values", "uint8", "-q"]),
                      (train_cli, [str(store), str(small_folder), "--out", str(ro / "run"), "--schedule", "soft:1", "--batch-size", "8",
                                   "-q"])):
        r = CliRunner().invoke(cli, args)
        one_line_error(r, "is on a read-only file system: write to a writable location", str(ro))


def test_convert_from_a_damaged_source_leaves_no_staging_folder(store, tmp_path):
    chunk = store / "labels" / "indices" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["convert", str(store), str(tmp_path / "c.zarr"), "--top-k", "2", "--values",
                                  "uint8", "-q"])
    one_line_error(r, "damaged")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hald-store-")) == []
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("exc,words", [
    (OSError(errno.EMFILE, "Too many open files", "/data/x.jpg"), "too many open files (at '/data/x.jpg'): raise the limit"),
    (OSError(errno.ENFILE, "Too many open files in system"), "the system ran out of open files (at '/out')"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded writing '/out'"),
    (MemoryError(), "out of memory writing /out: lower batch_size or workers"),
])
def test_environment_failures_name_the_path_and_what_to_do(exc, words):
    assert words in str(environment_failure(exc, "/out"))
    assert environment_failure(OSError(errno.ENOENT, "No such file"), "/out") is None  # not the machine's fault


def test_too_many_open_files_is_one_line_naming_the_store(store, tmp_path):
    """Under a real open-file limit (no descriptor left), not "not a Zarr group"."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results = []
    for args in (["info", str(store)], ["convert", str(store), str(tmp_path / "c.zarr"), "--top-k", "2", "--values",
                                        "uint8", "-q"]):
        lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new descriptor must be below the limit
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            results.append(CliRunner().invoke(main, args))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for r in results:
        one_line_error(r, f"too many open files (at '{store}", "raise the limit (ulimit -n)")
