"""How long the demo's teacher step takes per epoch at 1 and at 2 torch threads, side by side
(interleaved rounds, medians, the load logged), and the quick demo's teacher share.

    python benchmarks/demo_time.py [--rounds 3] [--epochs 2]

Writes benchmarks/results/demo_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hald_train.demo import QUICK, train_teacher
from hald_train.scenes import make_shapes_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="teacher epochs per timing")
    args = ap.parse_args()
    s = replace(QUICK, teacher_epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_shapes_dataset(Path(tmp) / "scenes", num_classes=s.num_classes, train_per_class=s.train_per_class,
                                   test_per_class=s.test_per_class, size=s.image_size, seed=s.seed)
        times: dict[int, list[float]] = {1: [], 2: []}
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for threads in times:  # interleaved: both see the same machine
                torch.set_num_threads(threads)
                t = time.perf_counter()
                train_teacher(data / "train", data / "test", s, progress=False)
                times[threads].append((time.perf_counter() - t) / args.epochs)
                loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'torch threads':<15}{'s per teacher epoch (median)':>30}{'runs':>30}")
    for k, v in times.items():
        print(f"{k:<15}{med[k]:>30.2f}{', '.join(f'{x:.1f}' for x in v):>30}")
    print(f"2 threads / 1 thread: {med[2] / med[1]:.2f}x; 1-min load average {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores")
    out = Path(__file__).parent / "results" / "demo_time.json"
    out.write_text(json.dumps({"seconds_per_teacher_epoch": times, "median": med, "ratio_2_over_1": med[2] / med[1],
                               "load_average_1min": loads, "cpu_cores": os.cpu_count(), "epochs_per_timing": args.epochs},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
