"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have used since boot, CPU seconds of this process and its
    reaped children): their deltas tell how much CPU other processes took during a run."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
