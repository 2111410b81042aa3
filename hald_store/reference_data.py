"""Locate the project's real reference data (CIFAR-10 JPEGs, distilled sets, teachers).

Tests and benchmarks read it from ``$HALD_DATA`` or, by default, ``../shared/data`` next to
the repository. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_dir() -> Path:
    """The reference data directory (it may not exist; callers check)."""
    return Path(os.environ.get("HALD_DATA", _DEFAULT))


def shared_data_path(*parts: str) -> Path | None:
    """``shared_data_dir()/parts``, or None when it is absent."""
    path = shared_data_dir().joinpath(*parts)
    return path if path.exists() else None
