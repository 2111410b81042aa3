"""benchmarks/gpu_check.py --dry-run: the first-GPU check's steps, on the CPU at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_one_passing_report(tmp_path):
    pytest.importorskip("nvidia.dali", reason="the GPU check renders with DALI")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--work",
                           str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu" and report["passed"]
    ex = report["exactness"]
    assert ex["bit_identical"] and ex["max_abs_levels"] == 0 and ex["crops"] == 3 * 4 * 2  # CPU against CPU
    rates = report["throughput"]["images_per_s"]
    assert set(rates) == {"hald-store loader (DALI, default)", "bare DALI graph (physical limit)"}
    assert all(r > 0 for r in rates.values())
    train = report["train"]
    assert train["device"] == "cpu" and not train["amp_bf16"] and train["loss"] > 0
    assert report["build"]["crops"] == 24
    scaling = report["cpu_scaling"]
    assert set(scaling["images_per_s"]) == {"loader", "rendering", "pillow", "bare", "machine"}
    assert all(r["1"] > 0 for r in scaling["images_per_s"].values())
    assert all(s["1"] == 1.0 for s in scaling["speedup_vs_1_core"].values())
