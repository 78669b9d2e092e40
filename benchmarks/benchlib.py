"""What the benchmarks share: dropping the page cache, and rates in MB/s."""

from __future__ import annotations

import os
from pathlib import Path


def drop_caches() -> bool:
    """sync, then drop the page cache (root only); False when it could not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def rate(nbytes: int, seconds: float) -> float:
    """Bytes per second in MB/s (10^6)."""
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0
