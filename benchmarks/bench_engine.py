"""Extent store throughput against plain files on the same device.

Builds a pool with 6 disk directories on one filesystem (under /var/tmp or --dir; not
tmpfs), then for replicate:3 and ec:4+2:

- engine write: ExtentStore.store() of 1 MiB extents, 8 per metadata change, one
  group commit at the end (fragments synced before the metadata, as in production);
- plain write: the same number of fragment bytes (size x policy overhead) written as
  1 MiB writes spread over 6 files in the 6 directories, fsync at the end;
- engine read / plain read: the data bytes read back through ExtentStore.read() (every
  fragment and the extent checksummed) and with plain 1 MiB reads of the plain files,
  each after sync and dropping the page cache (needs root).

Figures are MB/s of file data (10^6 bytes per second), the ratio to plain, and the
peak resident memory of the process. Targets: write and read >= 0.7x plain, peak
memory < 300 MiB.

    python benchmarks/bench_engine.py [--size 1GiB] [--dir DIR] [--profile]
                                      [--policies replicate:3,ec:4+2] [--switch-interval S]

--profile runs the engine writes under cProfile (main thread only: fragment writes
and syncs in worker threads show up as waits) and prints the top 25 functions by
cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib import WARM_NOTE, drop_caches, load_average, make_pool, rate, scratch
from dynamicfs.engine.pool import Pool
from dynamicfs.namespace.fs import READ_AHEAD
from dynamicfs.redundancy.policy import Policy, parse_concrete
from dynamicfs.sizes import format_size, parse_size

MiB = 1024 * 1024
EXTENT = MiB
BATCH = 8
DISKS = 6
SOURCE = 32 * MiB  # random bytes the extents are cut from
TARGET_RATIO = 0.7
TARGET_MEMORY = 300 * MiB


@dataclass
class Figures:
    policy: str
    phase: str
    engine: float  # MB/s of file data
    plain: float

    @property
    def ratio(self) -> float:
        return self.engine / self.plain if self.plain else 0.0


class Source:
    """Distinct 1 MiB extents cut at shifting offsets from one random buffer."""

    def __init__(self) -> None:
        self.buf = os.urandom(SOURCE + EXTENT)

    def extent(self, i: int) -> bytes:
        start = (i * 1_048_573) % SOURCE  # a prime step: every extent differs
        return self.buf[start: start + EXTENT]


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts."""
    best, kind = "", "unknown"
    real = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the engine ---------------------------------------------------------------------------
def engine_write(pool: Pool, source: Source, count: int, policy: Policy) -> list[int]:
    ids: list[int] = []
    for start in range(0, count, BATCH):
        items = [(source.extent(i), policy) for i in range(start, min(count, start + BATCH))]
        with pool.meta.write() as conn:
            ids += pool.store.store(conn, items)
    pool.meta.commit()
    return ids


def engine_read(pool: Pool, ids: list[int], ahead: int = READ_AHEAD) -> int:
    """Read every extent in order, with the read-ahead a sequential reader of the mount
    gets (the namespace prefetches the next `ahead` extents)."""
    total = 0
    for n, extent_id in enumerate(ids):
        pool.store.prefetch(ids[n + 1: n + 1 + ahead])
        total += len(pool.store.read(extent_id))
    return total


def engine_forget(pool: Pool, ids: list[int]) -> None:
    """Delete the extents (files go at the commit) so the next policy starts empty."""
    with pool.meta.write() as conn:
        for extent_id in ids:
            pool.store.delete_extent(conn, extent_id)
    pool.meta.commit()


# -- plain files ---------------------------------------------------------------------------
def plain_write(dirs: list[Path], source: Source, nbytes: int) -> list[Path]:
    paths = [d / "plain.bin" for d in dirs]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]
    try:
        for i in range(nbytes // EXTENT):
            os.write(fds[i % len(fds)], source.extent(i))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return paths


def plain_read(paths: list[Path], nbytes: int) -> int:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    total = 0
    try:
        for i in range(nbytes // EXTENT):
            total += len(os.read(fds[i % len(fds)], EXTENT))
    finally:
        for fd in fds:
            os.close(fd)
    return total


# -- one policy ---------------------------------------------------------------------------
def run_policy(pool_dir: Path, disk_dirs: list[Path], source: Source, size: int,
               policy: Policy, profile: bool, cold: bool) -> list[Figures]:
    count = size // EXTENT
    data = count * EXTENT
    pool = Pool.open(pool_dir)
    try:
        ids: list[int] = []

        def write() -> None:
            ids.extend(engine_write(pool, source, count, policy))

        if profile:
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.runcall(write)
            t_engine_w = time.perf_counter() - start
            print(f"\n--- cProfile of the engine write, {policy} (main thread) ---")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
        else:
            t_engine_w = timed(write)
    finally:
        pool.close()

    fragment_bytes = int(data * policy.overhead)
    t_plain_w = timed(lambda: plain_write(disk_dirs, source, fragment_bytes))

    if cold:
        drop_caches()
    pool = Pool.open(pool_dir)
    try:
        sample = pool.store.read(ids[-1])
        assert sample == source.extent(count - 1), "engine read back different bytes"
        pool.store.cache.drop(ids[-1])
        if cold:
            drop_caches()
        t_engine_r = timed(lambda: engine_read(pool, ids))
        engine_forget(pool, ids)
    finally:
        pool.close()

    paths = [d / "plain.bin" for d in disk_dirs]
    if cold:
        drop_caches()
    t_plain_r = timed(lambda: plain_read(paths, data))
    for p in paths:
        p.unlink()

    name = str(policy)
    return [Figures(name, "write", rate(data, t_engine_w), rate(data, t_plain_w)),
            Figures(name, "read", rate(data, t_engine_r), rate(data, t_plain_r))]


def warm_up(disk_dirs: list[Path], source: Source, size: int) -> None:
    """The first big write of a run is often much slower than the next: take it here."""
    paths = plain_write(disk_dirs, source, min(size, 256 * MiB))
    for p in paths:
        p.unlink()


def report(figures: list[Figures], peak: int, cold: bool) -> None:
    print(f"\n{'policy':<13}{'phase':<7}{'engine MB/s':>12}{'plain MB/s':>12}{'ratio':>8}"
          f"  target")
    for f in figures:
        ok = "ok" if f.ratio >= TARGET_RATIO else "MISSED"
        print(f"{f.policy:<13}{f.phase:<7}{f.engine:>12.0f}{f.plain:>12.0f}{f.ratio:>7.2f}x"
              f"  >= {TARGET_RATIO}x plain: {ok}")
    ok = "ok" if peak < TARGET_MEMORY else "MISSED"
    print(f"peak memory (ru_maxrss): {format_size(peak)}  target < "
          f"{format_size(TARGET_MEMORY)}: {ok}")
    if not cold:
        print(WARM_NOTE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1GiB", help="file data per policy (default 1GiB)")
    parser.add_argument("--dir", default="/var/tmp", type=Path,
                        help="where to create the disks (default /var/tmp; not tmpfs)")
    parser.add_argument("--policies", default="replicate:3,ec:4+2")
    parser.add_argument("--profile", action="store_true",
                        help="profile the engine writes with cProfile")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                        help="sys.setswitchinterval() for the run (the GIL hand-over "
                             "period; Python's default is 0.005)")
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    size = parse_size(args.size)
    if size < EXTENT:
        parser.error("--size must be at least 1MiB")
    kind = filesystem_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        parser.error(f"{args.dir} is on {kind}: pick a directory on a real disk with --dir")
    policies = [parse_concrete(p) for p in args.policies.split(",")]
    need = int(size * max(p.overhead for p in policies) * 2.2)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        parser.error(f"{args.dir} has {format_size(free)} free, {format_size(need)} needed")

    with scratch(args.dir, "dynamicfs-bench-") as base:
        cold = drop_caches()
        print(f"engine benchmark: {format_size(size)} per policy, {DISKS} disks in {base} "
              f"({kind}), {EXTENT // MiB} MiB extents, {BATCH} per metadata change; "
              f"load average {load_average()}")
        pool_dir, disk_dirs = make_pool(base, DISKS)
        source = Source()
        warm_up(disk_dirs, source, size)
        figures: list[Figures] = []
        for policy in policies:
            figures += run_policy(pool_dir, disk_dirs, source, size, policy, args.profile,
                                  cold)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report(figures, peak, cold)
        print(f"load average at the end: {load_average()} "
              "(other work on the machine skews figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
