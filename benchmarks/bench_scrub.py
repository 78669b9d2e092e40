"""Scrub throughput against a plain read of the same bytes on the same device.

Builds a pool with 6 disk directories on one filesystem (under /var/tmp or --dir; not
tmpfs), stores --size of file data as 1 MiB extents under each policy, then, each
after sync and dropping the page cache (needs root):

- scrub: maintenance.scrub.scrub() of the whole pool (every fragment read, parsed,
  checksummed against its header and the metadata, every extent decoded and checked);
- plain read: every fragment file of the pool read once, one after another, with
  plain 1 MiB reads (what `cat` of the same files does);
- engine read: ExtentStore.read() of every extent (the user's read path: k fragments).

Figures are MB/s of fragment bytes read (10^6 bytes per second) for scrub and plain
read, of file data for the engine read. Target: scrub >= 0.5x the plain read.

    python benchmarks/bench_scrub.py [--size 512MiB] [--dir DIR] [--policies ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import drop_caches, rate
from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.redundancy.policy import Policy, parse_concrete
from dynamicfs.sizes import format_size, parse_size

MiB = 1024 * 1024
EXTENT = MiB
BATCH = 8
DISKS = 6
SOURCE = 32 * MiB
TARGET_RATIO = 0.5


def make_pool(base: Path) -> Path:
    pool_dir = base / "pool"
    init_pool(pool_dir)
    with Pool.open(pool_dir) as pool:
        for i in range(DISKS):
            disk = base / f"disk{i}"
            disk.mkdir()
            add_disk(pool, disk)
    return pool_dir


def fill(pool: Pool, size: int, policy: Policy) -> list[int]:
    buf = os.urandom(SOURCE + EXTENT)
    ids: list[int] = []
    count = size // EXTENT
    for start in range(0, count, BATCH):
        items = []
        for i in range(start, min(count, start + BATCH)):
            at = (i * 1_048_573) % SOURCE
            items.append((buf[at: at + EXTENT], policy))
        with pool.meta.write() as conn:
            ids += pool.store.store(conn, items)
    pool.meta.commit()
    return ids


def plain_read(base: Path) -> int:
    total = 0
    for path in sorted(base.glob("disk*/fragments/*/*.frag")):
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, MiB):
                total += len(chunk)
        finally:
            os.close(fd)
    return total


def run_policy(base: Path, pool_dir: Path, size: int, policy: Policy, cold: bool) -> str:
    with Pool.open(pool_dir) as pool:
        ids = fill(pool, size, policy)
    if cold:
        drop_caches()
    with Pool.open(pool_dir) as pool:
        start = time.perf_counter()
        report = scrub(pool, restart=True)
        t_scrub = time.perf_counter() - start
    assert report.clean and report.checked == len(ids), "scrub found problems"
    if cold:
        drop_caches()
    start = time.perf_counter()
    plain = plain_read(base)
    t_plain = time.perf_counter() - start
    if cold:
        drop_caches()
    with Pool.open(pool_dir) as pool:
        start = time.perf_counter()
        data = sum(len(pool.store.read(i)) for i in ids)
        t_engine = time.perf_counter() - start
        with pool.meta.write() as conn:
            for extent_id in ids:
                pool.store.delete_extent(conn, extent_id)
        pool.meta.commit()
    ratio = rate(report.fragment_bytes, t_scrub) / rate(plain, t_plain)
    ok = "ok" if ratio >= TARGET_RATIO else "MISSED"
    return (f"{str(policy):<13}{rate(report.fragment_bytes, t_scrub):>11.0f}"
            f"{rate(plain, t_plain):>12.0f}{ratio:>7.2f}x{rate(data, t_engine):>13.0f}"
            f"  >= {TARGET_RATIO}x plain: {ok}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="512MiB", help="file data per policy")
    parser.add_argument("--dir", default="/var/tmp", type=Path,
                        help="where to create the disks (default /var/tmp; not tmpfs)")
    parser.add_argument("--policies", default="ec:4+2,replicate:3")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    policies = [parse_concrete(p) for p in args.policies.split(",")]
    need = int(size * max(p.overhead for p in policies) * 1.2)
    if shutil.disk_usage(args.dir).free < need:
        parser.error(f"{args.dir} has less than {format_size(need)} free")
    base = Path(tempfile.mkdtemp(prefix="dynamicfs-bench-scrub-", dir=args.dir))
    cold = drop_caches()
    print(f"scrub benchmark: {format_size(size)} per policy, {DISKS} disks in {base}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    try:
        pool_dir = make_pool(base)
        print(f"{'policy':<13}{'scrub MB/s':>11}{'plain MB/s':>12}{'ratio':>8}"
              f"{'engine MB/s':>13}  target")
        for policy in policies:
            print(run_policy(base, pool_dir, size, policy, cold), flush=True)
        if not cold:
            print("note: page cache not dropped (not root?): reads are warm")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
