"""Scale test of the build path at ImageNet/FKD shape, with SYNTHETIC logits (clearly labelled).

The library's own write path runs: ``StoreWriter`` (lock, create or resume), crops planned
and written one chunk of images at a time (``plan_image_crops``), ``BlockAssembler``
(per-batch encoding, block writes, done markers) -- only the teacher over rendered crops is
replaced by synthetic logits and the images by a synthetic manifest. Each store is built
half-way and stopped (as a kill would), resumed to completion, then read (an epoch pass and
random batches), each phase in its own process so that its peak RSS is its own.

    .venv/bin/python benchmarks/scale.py --quick              # 2,000 x 500 crops (1M records)
    .venv/bin/python benchmarks/scale.py                      # 20,000 x 500 (10M) and 200,000 x 500 (100M)
    .venv/bin/python benchmarks/scale.py --compare-chunking   # chunk_images 256/1024/4096 at 20,000 x 500
    .venv/bin/python benchmarks/scale.py --keep               # keep the stores afterwards
    .venv/bin/python benchmarks/scale.py --epoch-bytes        # bytes an epoch reads per rank (2 ranks), block
                                                              # vs sharded layout, local disk + S3 (moto), 10M
                                                              # records (--num-images 200000: 100M)

Stores go to ``benchmarks/results/scale/`` (deleted unless ``--keep``); results to
``benchmarks/results/scale.json`` (``scale-quick.json``, ``scale-chunking.json``). Reads hit a
warm page cache. The run ends by printing how much CPU other processes took meanwhile.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hald_store import CropPolicy, LabelCodec, LabelStore, Manifest, __version__, build_store
from hald_store.schema import RenderSpec, StoreSettings, TeacherInfo
from hald_store.writer import BlockAssembler, StoreWriter
from hald_store.crop_plan import plan_image_crops
from hald_store.order import epoch_crop_seeds
from hald_store.sources import Sampling, StoredCrops
from hald_store.testing import open_counted

from common import busy_cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"
BUILD_DEFAULTS = {k: p.default for k, p in inspect.signature(build_store).parameters.items()}
OWN_CLASS_FRACTION = 0.8  # share of crops whose logit peak is on the image's own class
PEAK_RANGE = (4.0, 12.0)  # height of the peak above N(0, 1) noise
NOISY_CLASSES = 16
TEACHER_BATCH = 4096  # crops per synthetic "teacher" batch
SYNTHETIC_NOTE = (
    f"SYNTHETIC logits: N(0,1) noise on {NOISY_CLASSES} random classes per crop plus a peak of height "
    f"U{PEAK_RANGE} on a 'true class' "
    f"(the image's class for {OWN_CLASS_FRACTION:.0%} of the crops, a uniformly random class otherwise); "
    "top-2..k indices are therefore random, which makes label compression pessimistic compared with a real teacher"
)


# ------------------------------------------------------------------ synthetic data
def synthetic_manifest(num_images: int, num_classes: int, seed: int) -> Manifest:
    """An ImageFolder-like manifest: balanced classes in folder order, sizes ~300-500 px."""
    rng = np.random.default_rng([seed, 0])
    labels = np.arange(num_images, dtype=np.int64) * num_classes // num_images
    heights = rng.integers(300, 501, num_images).astype(np.int32)
    widths = rng.integers(300, 501, num_images).astype(np.int32)
    return Manifest(
        paths=[f"n{c:05d}/img_{i:07d}.JPEG" for i, c in enumerate(labels)],
        labels=labels,
        class_names=[f"n{c:05d}" for c in range(num_classes)],
        nbytes=(heights.astype(np.int64) * widths * rng.uniform(0.3, 0.9, num_images)).astype(np.int64),
        digests=rng.integers(0, 256, (num_images, 16), dtype=np.uint8),
        heights=heights,
        widths=widths,
    )


def synthetic_logits(labels: np.ndarray, num_classes: int, seed: int, key: int) -> torch.Tensor:
    """SYNTHETIC logits (len(labels), C) float32, one row per crop of an image of class
    ``labels[i]``; deterministic in ``(seed, key)``. N(0, 1) noise on NOISY_CLASSES random classes
    per row (cheap at any C, and random top-k indices: pessimistic for compression) plus a peak."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, key]).generate_state(1)[0]))
    rows = len(labels)
    z = torch.zeros(rows, num_classes)
    cols = torch.randint(num_classes, (rows, NOISY_CLASSES), generator=g)
    z.scatter_(1, cols, torch.randn(rows, NOISY_CLASSES, generator=g))
    own = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    other = torch.randint(num_classes, (rows,), generator=g)
    true = torch.where(torch.rand(rows, generator=g) < OWN_CLASS_FRACTION, own, other)
    lo, hi = PEAK_RANGE
    z[torch.arange(rows), true] += lo + (hi - lo) * torch.rand(rows, generator=g)
    return z


def store_settings(manifest: Manifest, crops: int, codec: LabelCodec, policy: CropPolicy, seed: int,
                   layout: str = "block") -> StoreSettings:
    """The settings a real build writes, with plausible values for a synthetic teacher."""
    size = BUILD_DEFAULTS["input_size"]
    return StoreSettings(
        num_images=len(manifest), crops_per_image=crops, num_classes=codec.num_classes,
        class_names=tuple(manifest.class_names), plan_seed=seed, crop_policy=policy,
        render_spec=RenderSpec("synthetic", size, tuple(BUILD_DEFAULTS["mean"]), tuple(BUILD_DEFAULTS["std"])),
        teacher=TeacherInfo("synthetic-logits", None, "eval", {"synthetic": True}), codec=codec,
        manifest_blake2b=manifest.fingerprint(), skipped=tuple(manifest.skipped), layout=layout,
    )


# ------------------------------------------------------------------ write phase
def write_phase(path: str, args: argparse.Namespace, chunk_images: int, resume: bool,
                stop_after: int | None) -> dict[str, Any]:
    """Build (or resume) the store through the library's own writer: ``StoreWriter`` (lock,
    create or resume), block-by-block planning (``plan_image_crops``), and ``BlockAssembler``
    (per-batch encoding, block writes), with synthetic logits in place of a teacher over
    rendered crops. ``stop_after`` blocks ends the run early, as a kill would (runs in a child
    process so its peak RSS is its own)."""
    torch.set_num_threads(1)
    codec = LabelCodec(values=args.values, top_k=args.top_k, num_classes=args.num_classes,
                       temperature=float(BUILD_DEFAULTS["temperature"]))
    manifest = synthetic_manifest(args.num_images, args.num_classes, args.seed)
    policy, s = CropPolicy(), args.crops_per_image
    settings = store_settings(manifest, s, codec, policy, args.seed, args.layout)
    t0 = time.perf_counter()
    secs = {"logits": 0.0, "encode_write": 0.0}
    written = 0
    with StoreWriter(path, resume=resume) as writer:
        store = writer.open(manifest, lambda a, b: plan_image_crops(args.seed, a, b, s, manifest.heights,
                                                                   manifest.widths, policy),
                            settings, chunk_images)
        create_s = time.perf_counter() - t0
        rss_create = peak_rss_mib()
        blocks = BlockAssembler(store)
        todo = writer.todo()[:stop_after]
        total = sum(int(np.prod(store.block_shape(b))) for b in todo)
        with tqdm(total=total, desc="resume" if resume else "build", unit="crop", unit_scale=True,
                  dynamic_ncols=True) as bar:
            for block in todo:
                start, stop = store.block_range(block)
                labels = np.repeat(manifest.labels[start:stop], s)
                for b0 in range(0, len(labels), TEACHER_BATCH):
                    t1 = time.perf_counter()
                    z = synthetic_logits(labels[b0 : b0 + TEACHER_BATCH], args.num_classes, args.seed,
                                         block * 1_000_003 + b0)
                    t2 = time.perf_counter()
                    written += blocks.add(block, np.arange(b0, b0 + len(z)), z)
                    secs["logits"] += t2 - t1
                    secs["encode_write"] += time.perf_counter() - t2
                    bar.update(len(z))
    disk = disk_usage(Path(path))
    crops = args.num_images * s
    return {
        "resume": resume, "blocks_written": len(todo), "crops_written": written, "crops": crops,
        "blocks": store.num_blocks, "create_s": create_s, "synthetic_logits_s": secs["logits"],
        "encode_write_s": secs["encode_write"],
        "write_crops_per_s": written / secs["encode_write"] if secs["encode_write"] else 0.0,
        **disk, "bytes_per_crop": disk["bytes"] / crops, "label_bytes_per_crop": disk["label_bytes"] / crops,
        "raw_label_bytes_per_crop": codec.bytes_per_crop(), "reference_fp16_bytes_per_crop": 2 * codec.num_classes,
        "peak_rss_mib_after_create": rss_create, "peak_rss_mib": peak_rss_mib(),
    }


def disk_usage(path: Path) -> dict[str, int]:
    """Files and bytes under the store directory, in total and under ``labels/``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    labels = [p for p in files if p.relative_to(path).parts[0] == "labels"]
    return {
        "files": len(files),
        "label_files": len(labels),
        "bytes": sum(p.stat().st_size for p in files),
        "label_bytes": sum(p.stat().st_size for p in labels),
    }


def in_child(fn, *args) -> Any:
    """``fn(*args)`` in a fresh (spawned) process, so its peak RSS is its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------ read phase
def peak_rss_mib() -> float:
    """Peak resident set size of this process so far: ``VmHWM`` of /proc/self/status, which,
    unlike ``ru_maxrss``, does not inherit the parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB or bytes


def random_batches(store: LabelStore, batches: int, batch_size: int, seed: int) -> dict[str, float]:
    """``batches`` random batches of (image, crop seed) pairs: read, then dense probs at the
    build temperature; one untimed warm-up batch first."""
    rng = np.random.default_rng([seed, 1])
    n, s, ci = store.num_images, store.crops_per_image, store.chunk_images
    store.read(rng.integers(n, size=batch_size), rng.integers(s, size=batch_size)).probs(store.temperature)
    read_s = probs_s = 0.0
    blocks = []
    for _ in range(batches):
        images, seeds = rng.integers(n, size=batch_size), rng.integers(s, size=batch_size)
        t0 = time.perf_counter()
        labels = store.read(images, seeds)
        t1 = time.perf_counter()
        labels.probs(store.temperature)
        probs_s += time.perf_counter() - t1
        read_s += t1 - t0
        blocks.append(len(np.unique(images // ci)))
    arrays = len(store.codec.fields())
    chunk_raw = ci * s * store.codec.bytes_per_crop()
    total = read_s + probs_s
    return {
        "batches": batches,
        "batch_size": batch_size,
        "batches_per_s": batches / total,
        "labels_per_s": batches * batch_size / total,
        "ms_per_batch_read": 1e3 * read_s / batches,
        "ms_per_batch_probs": 1e3 * probs_s / batches,
        "blocks_per_batch": float(np.mean(blocks)),
        "label_arrays": arrays,
        "chunk_reads_per_batch": float(np.mean(blocks)) * arrays,
        "decompressed_mib_per_batch": float(np.mean(blocks)) * chunk_raw / 2**20,
    }


def epoch_pass(store: LabelStore, batch_size: int) -> dict[str, float]:
    """One crop per image via ``read_one_crop_per_image`` (labels, boxes, flips), then its
    labels decoded to top-k (``dense=False``) in batches, as a loader does per epoch."""
    n = store.num_images
    seeds = epoch_crop_seeds(n, store.crops_per_image, epoch=0)
    t0 = time.perf_counter()
    fields, _, _ = store.read_one_crop_per_image(seeds)
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b0 in range(0, n, batch_size):
        store.codec.decode({k: v[b0 : b0 + batch_size] for k, v in fields.items()})
    decode_s = time.perf_counter() - t0
    return {"read_s": read_s, "decode_s": decode_s, "labels_per_s": n / (read_s + decode_s)}


def read_phase(path: str, batches: int, batch_size: int, seed: int) -> dict[str, Any]:
    """An epoch pass, then random batches, on a freshly opened store (runs in a child process)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    store = LabelStore.open(path)
    open_s = time.perf_counter() - t0
    epoch = epoch_pass(store, batch_size)
    rss_epoch = peak_rss_mib()
    rand = random_batches(store, batches, batch_size, seed)
    return {"open_s": open_s, "random": rand, "epoch": epoch, "peak_rss_mib_after_epoch": rss_epoch,
            "peak_rss_mib_after_random": peak_rss_mib()}


# ------------------------------------------------------------------ epoch bytes
def files_per_array(path: Path) -> dict[str, int]:
    """Files (chunks or shards) of each per-crop array: the file count an object store lists."""
    arrays = [p for p in (path / "labels").iterdir() if p.is_dir()] + [path / "crops" / "box", path / "crops" / "flip"]
    return {str(a.relative_to(path)): sum(1 for f in (a / "c").rglob("*") if f.is_file()) for a in arrays}


def epoch_bytes(path: str, ranks: int, epochs: int, seed: int, storage_options: dict | None = None) -> dict[str, Any]:
    """Bytes each of ``ranks`` ranks requests (counted below zarr, per key) when its loader
    fetches its share of each of ``epochs`` epochs (labels, boxes, flips): what a
    ``SoftLabelLoader`` reads per epoch. Metadata and the manifest are read before counting."""
    runs = []
    for epoch in range(epochs):
        blocks = []
        for rank in range(ranks):
            store, counter = open_counted(path, storage_options)
            manifest = store.manifest()
            for name in store.array_names():
                store.array(name)
            source = StoredCrops(store, store.temperature, False, seed, Sampling(seed, True, rank, ranks, False))
            counter.reset()
            t0 = time.perf_counter()
            source.crops(manifest, epoch)
            secs = time.perf_counter() - t0
            chunks = {k: v for k, v in counter.keys.items() if "/c/" in k}
            touched = {int(k.split("/c/")[1].split("/")[0]) for k in chunks}
            blocks.append(touched)
            runs.append({"epoch": epoch, "rank": rank, "s": secs, "gets": len(chunks),
                         "label_bytes": sum(v for k, v in chunks.items() if k.startswith("labels/")),
                         "crop_bytes": sum(v for k, v in chunks.items() if k.startswith("crops/")),
                         "blocks_touched": len(touched), "blocks": store.num_blocks,
                         "images": len(source.epoch_order(len(manifest), epoch, source.sampling))})
        shared = set.intersection(*blocks) if ranks > 1 else set()
        for r in runs[-ranks:]:
            r["blocks_shared_with_other_ranks"] = len(shared)
    return {"ranks": ranks, "epochs": epochs, "runs": runs}


def on_s3(path: Path, fn, *args) -> Any:
    """``fn(url, *args, storage_options=...)`` on a copy of the store at ``path`` served by a
    loopback moto S3 server (the object-store path of tests/test_remote.py), in this process."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench",
                   "client_kwargs": {"region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="labels")
        url = f"s3://labels/{path.name}"
        t0 = time.perf_counter()
        s3fs.S3FileSystem(**options).put(str(path), url, recursive=True)
        upload_s = time.perf_counter() - t0
        return {"upload_s": upload_s, **fn(url, *args, storage_options=options)}
    finally:
        server.stop()


def run_epoch_bytes(args: argparse.Namespace) -> dict[str, Any]:
    """Build the store in each layout (all blocks, through the library's writer), then count the
    bytes an epoch requests per rank, on local disk and (unless --no-s3) on the moto S3 server."""
    out = {}
    for layout in args.layouts:
        path = RESULTS / "scale" / f"synthetic-{args.num_images}x{args.crops_per_image}-{layout}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        print(f"\n== {args.num_images:,} images x {args.crops_per_image} crops, layout {layout} -> {path}")
        try:
            build = in_child(write_phase, str(path), argparse.Namespace(**{**vars(args), "layout": layout}),
                             args.chunk_images, False, None)
            local = in_child(epoch_bytes, str(path), args.ranks, args.epochs, args.seed)
            remote = None if args.no_s3 else in_child(on_s3, path, epoch_bytes, args.ranks, args.epochs, args.seed)
            out[layout] = {"build": build, "files_per_array": files_per_array(path), "local": local, "s3": remote}
        finally:
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
    return out


def print_epoch_bytes(result: dict[str, Any]) -> None:
    """Per layout and place: label bytes per rank per epoch (median over epochs) and the fraction
    of the store's label bytes one epoch reads over all ranks."""
    print(f"\n  {'layout':<8} {'where':<6} {'files/array':>12} {'label MiB':>10} {'rank':>4} {'label MiB/epoch':>16} "
          f"{'box+flip MiB':>13} {'blocks':>9} {'shared':>6} {'s':>6} {'epoch/labels':>13}")
    print("  (per rank: medians over epochs; blocks: mean blocks touched / blocks; shared: mean blocks touched by "
          "more than one rank; epoch/labels: label bytes all ranks read per epoch / label bytes on disk)")
    for layout, r in result.items():
        files = max(r["files_per_array"].values())
        label = r["build"]["label_bytes"]
        for where in ("local", "s3"):
            if r[where] is None:
                continue
            runs, ranks = r[where]["runs"], r[where]["ranks"]
            per_epoch = [sum(x["label_bytes"] for x in runs if x["epoch"] == e) for e in range(r[where]["epochs"])]
            for rank in range(ranks):
                mine = [x for x in runs if x["rank"] == rank]
                med = lambda k: float(np.median([x[k] for x in mine]))  # noqa: E731
                mean = lambda k: float(np.mean([x[k] for x in mine]))  # noqa: E731
                print(f"  {layout:<8} {where:<6} {files:>12,} {label / 2**20:>10,.1f} {rank:>4} "
                      f"{med('label_bytes') / 2**20:>16,.3f} {med('crop_bytes') / 2**20:>13,.3f} "
                      f"{mean('blocks_touched'):>4.1f}/{mine[0]['blocks']:<4} "
                      f"{mean('blocks_shared_with_other_ranks'):>6.1f} {med('s'):>6.2f} "
                      f"{float(np.median(per_epoch)) / label:>13.4f}")


# ------------------------------------------------------------------ driver
def run_one(args: argparse.Namespace, chunk_images: int) -> dict[str, Any]:
    """Build half the blocks (then stop, as a kill would), resume, read; deletes the store unless ``--keep``."""
    path = RESULTS / "scale" / f"synthetic-{args.num_images}x{args.crops_per_image}-ci{chunk_images}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    blocks = -(-args.num_images // chunk_images)
    print(f"\n== {args.num_images:,} images x {args.crops_per_image} crops, chunk_images {chunk_images} -> {path}")
    try:
        build = in_child(write_phase, str(path), args, chunk_images, False, blocks // 2)
        resume = in_child(write_phase, str(path), args, chunk_images, True, None)
        read = in_child(read_phase, str(path), args.batches, args.batch_size, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    return {"chunk_images": chunk_images, "path": str(path), "kept": args.keep, "build": build, "resume": resume,
            "read": read}


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(measure, value) rows of one run."""
    b, w, r = result["build"], result["resume"], result["read"]
    rb, ep = r["random"], r["epoch"]
    return [
        ("crop records", f"{w['crops']:,} ({w['blocks']} blocks of {result['chunk_images']} images)"),
        ("build: blocks written, then stopped", f"{b['blocks_written']} ({b['crops_written']:,} crops)"),
        ("resume: blocks written", f"{w['blocks_written']} ({w['crops_written']:,} crops)"),
        ("create (plan + manifest + boxes, streamed)", f"{b['create_s']:.1f} s"),
        ("synthetic logit generation (excluded)", f"{b['synthetic_logits_s'] + w['synthetic_logits_s']:.1f} s"),
        ("write (encode + write_block), build / resume",
         f"{b['write_crops_per_s']:,.0f} / {w['write_crops_per_s']:,.0f} crops/s"),
        ("files on disk (labels/)", f"{w['files']:,} ({w['label_files']:,})"),
        ("bytes on disk (labels/)", f"{w['bytes'] / 2**20:,.1f} MiB ({w['label_bytes'] / 2**20:,.1f} MiB)"),
        ("bytes per crop, total / labels (raw; fp16 ref)",
         f"{w['bytes_per_crop']:.2f} / {w['label_bytes_per_crop']:.2f} ({w['raw_label_bytes_per_crop']}; "
         f"{w['reference_fp16_bytes_per_crop']})"),
        ("peak RSS: build / resume / epoch read",
         f"{b['peak_rss_mib']:,.0f} / {w['peak_rss_mib']:,.0f} / {r['peak_rss_mib_after_epoch']:,.0f} MiB"),
        ("epoch pass (read + decode top-k)", f"{ep['labels_per_s']:,.0f} labels/s ({ep['read_s'] + ep['decode_s']:.1f} s)"),
        (f"random batches of {rb['batch_size']} (read + probs)",
         f"{rb['batches_per_s']:.2f} batches/s, {rb['chunk_reads_per_batch']:.0f} chunk reads, "
         f"{rb['decompressed_mib_per_batch']:.0f} MiB decompressed per batch"),
    ]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def print_comparison(results: list[dict[str, Any]]) -> None:
    """One line per chunking."""
    print(f"\n  {'chunk':>6} {'files':>7} {'B/crop':>7} {'write c/s':>10} {'batch/s':>8} "
          f"{'reads/b':>8} {'MiB/b':>7} {'epoch l/s':>10} {'RSS MiB':>8}")
    for res in results:
        w, r = res["resume"], res["read"]
        print(f"  {res['chunk_images']:>6} {w['files']:>7,} {w['bytes_per_crop']:>7.2f} {w['write_crops_per_s']:>10,.0f} "
              f"{r['random']['batches_per_s']:>8.2f} {r['random']['chunk_reads_per_batch']:>8.0f} "
              f"{r['random']['decompressed_mib_per_batch']:>7.1f} {r['epoch']['labels_per_s']:>10,.0f} "
              f"{max(res['build']['peak_rss_mib'], w['peak_rss_mib'], r['peak_rss_mib_after_epoch']):>8,.0f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 images x 500 crops (1M records), 5 random batches")
    p.add_argument("--compare-chunking", action="store_true",
                   help="compare --chunkings on a 20,000 x 500 store instead of the main run")
    p.add_argument("--chunkings", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--num-images", type=int, nargs="+", default=None,
                   help="stores to build, in images (default 20,000 and 200,000: 10M and 100M records)")
    p.add_argument("--crops-per-image", type=int, default=500)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=BUILD_DEFAULTS["top_k"])
    p.add_argument("--values", default=BUILD_DEFAULTS["values"])
    p.add_argument("--chunk-images", type=int, default=BUILD_DEFAULTS["chunk_images"])
    p.add_argument("--batches", type=int, default=None, help="random batches timed (default 20, 5 --quick)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the store(s) under benchmarks/results/scale/")
    p.add_argument("--layout", choices=["block", "sharded"], default="block", help="store layout of the main run")
    p.add_argument("--epoch-bytes", action="store_true",
                   help="instead of the main run: bytes an epoch reads per rank, for each of --layouts")
    p.add_argument("--layouts", nargs="+", choices=["block", "sharded"], default=["block", "sharded"])
    p.add_argument("--ranks", type=int, default=2, help="ranks simulated by --epoch-bytes")
    p.add_argument("--epochs", type=int, default=3, help="epochs counted by --epoch-bytes")
    p.add_argument("--no-s3", action="store_true", help="--epoch-bytes on local disk only (no moto S3 server)")
    p.add_argument("--json", type=Path, default=None,
                   help="default benchmarks/results/scale[-quick|-chunking|-epoch-bytes].json")
    args = p.parse_args()
    if args.num_images is None:
        args.num_images = ([2_000] if args.quick else [20_000] if args.compare_chunking or args.epoch_bytes
                           else [20_000, 200_000])
    if args.batches is None:
        args.batches = 5 if args.quick else 20
    if args.json is None:
        suffix = ("-epoch-bytes" if args.epoch_bytes else "-chunking" if args.compare_chunking
                  else "-quick" if args.quick else "")
        args.json = RESULTS / f"scale{suffix}.json"
    return args


def main() -> None:
    args = parse_args()
    print(SYNTHETIC_NOTE)
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}; reads hit a warm page cache")
    chunkings = args.chunkings if args.compare_chunking else [args.chunk_images]
    busy0, own0 = busy_cpu_seconds()
    t0 = time.perf_counter()
    if args.epoch_bytes:
        results = [{"num_images": n, **run_epoch_bytes(argparse.Namespace(**{**vars(args), "num_images": n}))}
                   for n in args.num_images]
        for res in results:
            print(f"\n-- {res['num_images'] * args.crops_per_image:,} crop records, {args.ranks} ranks, "
                  f"chunk_images {args.chunk_images}: bytes requested per rank per epoch (median of {args.epochs})")
            print_epoch_bytes({k: v for k, v in res.items() if k != "num_images"})
    else:
        results = [run_one(argparse.Namespace(**{**vars(args), "num_images": n}), ci)
                   for n in args.num_images for ci in chunkings]
    for res in [] if args.epoch_bytes else results:
        print(f"\n-- {res['build']['crops']:,} crop records, chunk_images {res['chunk_images']}")
        print_table(table(res))
    if args.compare_chunking:
        print_comparison(results)
    save_results(args, results, t0, busy0, own0)


def save_results(args: argparse.Namespace, runs: list[dict[str, Any]], t0: float, busy0: float, own0: float) -> None:
    """Print the wall time and the CPU other processes took since ``t0``; write ``args.json``."""
    wall = time.perf_counter() - t0
    busy1, own1 = busy_cpu_seconds()
    other = max(busy1 - busy0 - (own1 - own0), 0.0)
    print(f"\nwall time {wall:.0f} s; CPU used by this benchmark {own1 - own0:.0f} s, by other processes "
          f"{other:.0f} s (of {wall * os.cpu_count():.0f} CPU-s available; > ~5% means contended numbers)")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    out = {"synthetic": True, "note": SYNTHETIC_NOTE, "settings": settings, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "own_cpu_s": own1 - own0, "other_processes_cpu_s": other,
           "load_avg_at_end": os.getloadavg(), "library_version": __version__, "wall_s": wall, "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
