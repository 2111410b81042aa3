"""Start-up time of `hald-store --version`, `hald-store --help` and `hald-train --help`: this
checkout against another one (e.g. main before lazy imports), interleaved rounds, medians.

    python benchmarks/cli_startup.py --other /path/to/other/checkout [--rounds 5]

Writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
COMMANDS = {"hald-store --version": ["hald_store", "--version"], "hald-store --help": ["hald_store", "--help"],
            "hald-train --help": ["hald_train", "--help"]}


def once(root: Path, args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, check=True,
                   capture_output=True)  # cwd: `-m` puts the working directory first on sys.path
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    roots = {"other": a.other.resolve(), "this": HERE}
    times = {(r, c): [] for r in roots for c in COMMANDS}
    loads = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        for c, args in COMMANDS.items():
            for r, root in roots.items():  # interleaved
                times[r, c].append(once(root, args))
        loads.append(os.getloadavg()[0])
    print(f"{'command':<24}{'other (s)':>12}{'this (s)':>12}{'this/other':>12}")
    rows = []
    for c in COMMANDS:
        o, t = statistics.median(times["other", c]), statistics.median(times["this", c])
        rows.append({"command": c, "other_s": o, "this_s": t, "ratio": t / o})
        print(f"{c:<24}{o:>12.2f}{t:>12.2f}{t / o:>12.2f}")
    print(f"medians of {a.rounds} interleaved rounds; 1-min load average {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores; other = {roots['other']}")
    out = HERE / "benchmarks" / "results" / "cli_startup.json"
    out.write_text(json.dumps({"rows": rows, "runs": {f"{r} {c}": v for (r, c), v in times.items()},
                               "load_average_1min": loads, "other": str(roots["other"])}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
