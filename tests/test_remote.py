"""Stores on S3-compatible object storage: a real moto S3 server on loopback (not a mock of
the client) serves the bucket; builds, reads, loaders and resume go through s3fs."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from hald_store import LabelStore, SoftLabelLoader, build_store
from hald_store.errors import StoreError, TeacherOutputError

from .conftest import NaNTeacher

moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the loopback S3 server")
s3fs = pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3 = pytest.importorskip("boto3")
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="labels")
    yield options
    server.stop()


def test_round_trip_through_s3(s3, tmp_path, small_folder, resnet20):
    kw = dict(num_classes=10, crops_per_image=3, top_k=4, input_size=32, chunk_images=10, progress=False)
    build_store(small_folder, tmp_path / "local.zarr", resnet20, **kw)
    url = "s3://labels/run1/store.zarr"
    with pytest.warns(UserWarning, match="is an object store: hald-store cannot lock it"):
        summary = build_store(small_folder, url, resnet20, storage_options=s3, **kw)
    assert summary.crops_written == 72 and summary.bytes_on_disk > 0
    remote = LabelStore.open(url, storage_options=s3)
    assert remote.checksums and remote.missing_chunks() == [] and remote.info()["complete"]
    local, remote = LabelStore.open(tmp_path / "local.zarr"), LabelStore.open(url, storage_options=s3)
    i, s = np.divmod(np.arange(72), 3)
    assert torch.equal(local.read(i, s).indices, remote.read(i, s).indices)
    assert torch.equal(local.soft_labels(i, s), remote.soft_labels(i, s))
    assert remote.info()["num_crops"] == 72 and remote.bytes_on_disk("labels") > 0
    a = next(iter(SoftLabelLoader(local, small_folder, batch_size=8, backend="torchvision")))
    b = next(iter(SoftLabelLoader(remote, small_folder, batch_size=8, backend="torchvision")))
    assert torch.equal(a.images, b.images) and torch.equal(a.soft, b.soft)
    with pytest.raises(StoreError, match="already exists; pass resume=True"):
        build_store(small_folder, url, resnet20, storage_options=s3, **kw)


def test_interrupted_remote_build_is_not_valid_and_resumes(s3, tmp_path, small_folder, resnet20):
    """A build that dies mid-way (here the teacher fails on the 3rd batch, as a dropped
    connection would) leaves finished blocks marked and the rest unmarked; the store is
    refused as incomplete, and --resume completes it identically to a clean build."""
    kw = dict(num_classes=10, crops_per_image=3, top_k=4, input_size=32, chunk_images=4, batch_size=6,
              progress=False)
    url = "s3://labels/run2/store.zarr"
    with pytest.raises(TeacherOutputError):
        build_store(small_folder, url, NaNTeacher(resnet20, from_call=4), storage_options=s3, **kw)
    with pytest.raises(StoreError, match="incomplete"):
        LabelStore.open(url, storage_options=s3)
    partial = LabelStore.open(url, storage_options=s3, allow_incomplete=True)
    assert 0 < partial.block_done().sum() < partial.num_blocks
    build_store(small_folder, url, NaNTeacher(resnet20), storage_options=s3, resume=True, **kw)
    build_store(small_folder, tmp_path / "clean.zarr", resnet20, **kw)
    clean, resumed = LabelStore.open(tmp_path / "clean.zarr"), LabelStore.open(url, storage_options=s3)
    for name in ("labels/indices", "labels/codes", "labels/scale"):
        assert np.array_equal(clean.array(name)[:], resumed.array(name)[:]), name


def test_unreachable_store_is_a_clear_error():
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "x", "secret": "x", "retries": 1,
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(StoreError, match="cannot reach store location 's3://nowhere/x.zarr'"):
        LabelStore.open("s3://nowhere/x.zarr", storage_options=options)
