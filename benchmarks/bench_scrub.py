"""Scrub throughput against a plain read of the same bytes on the same device.

Builds a pool with 6 disk directories on one filesystem (under /var/tmp or --dir; not
tmpfs), stores --size of file data as 1 MiB extents under each policy, then, each
after sync and dropping the page cache (needs root):

- scrub: maintenance.scrub.scrub() of the whole pool (every fragment read, parsed,
  checksummed against its header and the metadata, every extent decoded and checked);
- plain read: every segment file of the pool (the files holding the fragments) read
  once, one after another, with plain 1 MiB reads (what `cat` of the same files does);
- engine read: ExtentStore.read() of every extent (the user's read path: k fragments).

Figures are MB/s of fragment bytes read (10^6 bytes per second) for scrub and plain
read, of file data for the engine read. Target: scrub >= 0.5x the plain read.

    python benchmarks/bench_scrub.py [--size 512MiB] [--dir DIR] [--policies ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from benchlib import (
    WARM_NOTE,
    drop_caches,
    fill,
    load_average,
    make_pool,
    rate,
    read_files,
    scratch,
)
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.redundancy.policy import Policy, parse_concrete
from dynamicfs.sizes import format_size, parse_size

MiB = 1024 * 1024
EXTENT = MiB
BATCH = 8
DISKS = 6
TARGET_RATIO = 0.5


def run_policy(base: Path, pool_dir: Path, size: int, policy: Policy, cold: bool) -> str:
    with Pool.open(pool_dir) as pool:
        ids = fill(pool, size, policy, EXTENT, BATCH)
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
    plain = read_files(sorted(base.glob("disk*/segments/*.seg")))
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
    with scratch(args.dir, "dynamicfs-bench-scrub-") as base:
        cold = drop_caches()
        print(f"scrub benchmark: {format_size(size)} per policy, {DISKS} disks in {base}; "
              f"load average {load_average()}")
        pool_dir, _ = make_pool(base, DISKS)
        print(f"{'policy':<13}{'scrub MB/s':>11}{'plain MB/s':>12}{'ratio':>8}"
              f"{'engine MB/s':>13}  target")
        for policy in policies:
            print(run_policy(base, pool_dir, size, policy, cold), flush=True)
        if not cold:
            print(WARM_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
