"""What the benchmarks share: a scratch directory, a pool to measure, data to fill it
with, plain reads of files, dropping the page cache, the load average, rates in MB/s."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.engine.pool import Pool
from dynamicfs.redundancy.policy import Policy

MiB = 1024 * 1024
WARM_NOTE = "note: page cache not dropped (not root?): reads are warm"


@contextmanager
def scratch(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory under `parent` for one run, removed afterwards whatever happens."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews figures)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


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


def make_pool(base: Path, disks: int = 6) -> tuple[Path, list[Path]]:
    """A new pool in base/pool with `disks` directory disks base/disk0..; (pool, disks)."""
    pool_dir = base / "pool"
    init_pool(pool_dir)
    paths = []
    with Pool.open(pool_dir) as pool:
        for i in range(disks):
            disk = base / f"disk{i}"
            disk.mkdir()
            add_disk(pool, disk)
            paths.append(disk)
    return pool_dir, paths


def fill(pool: Pool, size: int, policy: Policy, extent: int = MiB, batch: int = 8) -> list[int]:
    """Store `size` bytes of incompressible data as extents under `policy`; their ids."""
    source = 32 * MiB
    buf = os.urandom(source + extent)
    ids: list[int] = []
    count = size // extent
    for start in range(0, count, batch):
        items = [(buf[at: at + extent], policy)
                 for at in ((i * 1_048_573) % source
                            for i in range(start, min(count, start + batch)))]
        with pool.meta.write() as conn:
            ids += pool.store.store(conn, items)
        pool.meta.commit()
    return ids


def read_files(paths: Iterable[Path]) -> int:
    """Read each file whole in 1 MiB reads, as plain reads do; the bytes read."""
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, MiB):
                total += len(chunk)
        finally:
            os.close(fd)
    return total
