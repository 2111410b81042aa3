"""Label codec benchmark: encode/decode labels/s, bytes per crop and fidelity of every codec,
against the reference layout (the full fp16 probability vector per crop), on real teacher
outputs: the ResNet-56 teacher's logits on stored random crops of ``cifar10-mini/train``.

    python benchmarks/codec_throughput.py            # prints a table, writes JSON

Throughput is measured on the real logits tiled to ``--rows`` rows; sizes and fidelity on the
real rows only (tiling would flatter the compressor).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from hald_store import LabelCodec, LabelStore, build_store, load_teacher
from hald_store.codec import VALUE_CODECS, dense_fp16_probs
from hald_store.testing import shared_data_path
from hald_store.store import default_compressor
from hald_store.verify import teacher_logits


def best_rate(fn, rows: int, repeat: int) -> float:
    """Best-of-``repeat`` rows per second of ``fn()``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return rows / best


def compressed_bytes(arrays: dict[str, np.ndarray], chunk_rows: int) -> int:
    """Bytes on disk of ``arrays`` written as Zarr arrays the way a store writes labels."""
    with tempfile.TemporaryDirectory() as tmp:
        g = zarr.open_group(tmp, mode="w")
        for name, a in arrays.items():
            arr = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(min(chunk_rows, len(a)), *a.shape[1:]),
                                 compressors=default_compressor())
            arr[...] = a
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file() and f.name != "zarr.json")


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


def real_logits(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    teacher = load_teacher(args.teacher, args.checkpoint, num_classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        build_store(args.images, Path(tmp, "s.zarr"), teacher, teacher_name=args.teacher,
                    crops_per_image=args.crops_per_image, top_k=1, input_size=32, progress=False)
        store = LabelStore.open(Path(tmp, "s.zarr"))
        ids, seeds = np.divmod(np.arange(store.num_crops), store.crops_per_image)
        return teacher_logits(store, args.images, teacher, ids, seeds), store.render_spec.backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(shared_data_path("cifar10-mini", "train")))
    ap.add_argument("--teacher", default="cifar_resnet56")
    ap.add_argument("--checkpoint", default=str(shared_data_path("teachers", "cifar10-resnet56.th")))
    ap.add_argument("--crops-per-image", type=int, default=8)
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--rows", type=int, default=400_000, help="rows per timing run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/codec_throughput.json")
    args = ap.parse_args()
    if not Path(args.images).is_dir() or not Path(args.checkpoint).is_file():
        raise SystemExit(f"needs {args.images} and {args.checkpoint} (set HALD_DATA to the shared data folder)")

    logits, backend = real_logits(args)
    n, c = logits.shape
    t = args.temperature
    tiled = logits.repeat((args.rows + n - 1) // n, 1)[: args.rows].contiguous()
    tiled_np = tiled.numpy()
    truth_log = torch.log_softmax(logits / t, dim=1)
    truth_top1 = logits.argmax(dim=1)
    results = []

    ref = dense_fp16_probs(logits, t)
    ref_tiled = dense_fp16_probs(tiled, t)
    ref_log = torch.log(torch.from_numpy(ref).float().clamp_min(1e-30))
    results.append({
        "layout": "reference fp16 probs", "values": "fp16-probs", "top_k": c,
        "raw_bytes_per_crop": ref.itemsize * c,
        "bytes_per_crop": compressed_bytes({"probs": ref}, 1024) / n,
        "encode_labels_per_s": best_rate(lambda: dense_fp16_probs(tiled, t), len(tiled), args.repeat),
        "decode_labels_per_s": best_rate(lambda: torch.from_numpy(ref_tiled).float(), len(tiled), args.repeat),
        "mean_kl": float(kl(truth_log, ref_log).mean()),
        "top1_agreement": float((torch.from_numpy(ref).float().argmax(1) == truth_top1).double().mean()),
    })
    for k in sorted(set(min(k, c) for k in args.top_k)):
        for values in VALUE_CODECS:
            codec = LabelCodec(values=values, top_k=k, num_classes=c, temperature=t)
            fields = codec.encode(logits)
            fields_tiled = codec.encode(tiled)
            decoded = codec.decode(fields)
            results.append({
                "layout": "hald-store", "values": values, "top_k": k,
                "raw_bytes_per_crop": codec.bytes_per_crop(),
                "bytes_per_crop": compressed_bytes(fields, 1024) / n,
                "encode_labels_per_s": best_rate(lambda: codec.encode(tiled_np), len(tiled), args.repeat),
                "decode_labels_per_s": best_rate(lambda: codec.decode(fields_tiled).probs(t), len(tiled), args.repeat),
                "mean_kl": float(kl(truth_log, decoded.log_probs(t)).mean()),
                "top1_agreement": float((decoded.indices[:, 0] == truth_top1).double().mean()),
            })
    ref_bytes = results[0]["bytes_per_crop"]
    for r in results:
        r["size_vs_reference"] = r["bytes_per_crop"] / ref_bytes

    print(f"{n} real crops ({args.teacher}, {c} classes, backend {backend}), T={t:g}; "
          f"throughput on {len(tiled):,} rows, {torch.get_num_threads()} threads")
    print(f"{'layout':<22}{'values':<11}{'k':>3}{'raw B':>7}{'disk B':>8}{'vs ref':>8}"
          f"{'enc labels/s':>14}{'dec labels/s':>14}{'mean KL':>11}{'top-1':>8}")
    for r in results:
        print(f"{r['layout']:<22}{r['values']:<11}{r['top_k']:>3}{r['raw_bytes_per_crop']:>7}"
              f"{r['bytes_per_crop']:>8.2f}{r['size_vs_reference']:>8.2f}{r['encode_labels_per_s']:>14,.0f}"
              f"{r['decode_labels_per_s']:>14,.0f}{r['mean_kl']:>11.2e}{100 * r['top1_agreement']:>7.2f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"settings": meta, "num_crops": n, "num_classes": c, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
