"""Benchmark a mounted pool against a plain directory of the same device, in one run.

    python benchmarks/bench_mount.py [--size 1GiB] [--files 10000] [--dir /var/tmp]
                                     [--repeat N]

Six directory disks on one device. Each figure is printed next to the same work on a
plain directory of that device, with the ratio and the target:
- sequential write (`dd bs=1M conv=fsync`, after a throwaway write of the same size:
  a run's first large write is slow) and, after unmount, cache drop and remount,
  sequential read, with replicate:3 and with ec:4+2;
- N files of 4 KiB in 100 directories: create, `ls -lR` (cold), read all, delete; and
  the create on a do-nothing filesystem on the same FUSE session (null_fuse.py), the
  floor under the mount daemon on this machine;
- extracting a source tarball with thousands of files (the Python standard library),
  then `diff -r` against the plain copy;
  the create and the extraction are timed until they are durable: `sync` on the plain
  side, the mount daemon's sync operation (`dynamicfs sync`) on the mount, as sync(1)
  does not reach FUSE;
- the mount daemon's peak memory (VmHWM).
Figures are printed, never asserted: the machines are shared and noisy. With
--repeat N each workload runs N times, plain and DynamicFS one after the other each
time, and the medians are compared (every run's figure is printed too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dynamicfs.control import client  # noqa: E402
from dynamicfs.sizes import parse_size  # noqa: E402

MiB = 1024 * 1024


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


def dfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dynamicfs", *args], check=True,
                   stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("  (cannot drop caches: not root? read figures are warm)")


def settle(path: Path, quiet: float = 0.3, limit: float = 20.0) -> None:
    """Flush everything and wait until the device under `path` has had no request in
    flight for `quiet` seconds (at most `limit`). The filesystem here is mounted with
    `discard`: freeing a gigabyte (a deleted plain file, or fragments DynamicFS freed)
    sends discards at the next journal commit, and a write timed while the device works
    through them went at a quarter of its speed. Each timed workload starts settled."""
    os.sync()
    st = os.stat(path)
    inflight = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/inflight")
    deadline = time.monotonic() + limit
    calm_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            busy = any(int(n) for n in inflight.read_text().split())
        except (OSError, ValueError):
            return  # no such counter (not a block device): the sync is all we can do
        now = time.monotonic()
        if busy:
            calm_since = now
        elif now - calm_since >= quiet:
            return
        time.sleep(0.02)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Bench:
    def __init__(self, root: Path, size: int, files: int, repeat: int = 1) -> None:
        self.root = root
        self.size = size
        self.files = files
        self.repeat = repeat
        self.pool = root / "pool"
        self.mnt = root / "mnt"
        self.plain = root / "plain"
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.peak_kib = 0

    # -- set-up ---------------------------------------------------------------
    def setup(self) -> None:
        self.plain.mkdir()
        self.mnt.mkdir()
        dfs("init", str(self.pool))
        for i in range(6):
            disk = self.root / f"disk{i}"
            disk.mkdir()
            dfs("add-disk", str(self.pool), str(disk))
        self.source = self.root / "source.bin"
        with open(self.source, "wb") as f:
            for _ in range(self.size // (64 * MiB) or 1):
                f.write(os.urandom(min(self.size, 64 * MiB)))
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        self.tarball = self.root / "stdlib.tar"
        sh(f"tar -C {stdlib} --exclude=./site-packages --exclude=__pycache__ "
           f"-cf {self.tarball} .")

    def mount(self) -> None:
        dfs("mount", str(self.pool), str(self.mnt))

    def unmount(self) -> None:
        self.sample_memory()
        dfs("unmount", str(self.mnt))

    def sync(self) -> None:
        """What `dynamicfs sync MOUNTPOINT` does, without starting a Python for it (the
        plain side's sync(1) costs no interpreter either)."""
        client.call(self.pool, "sync", {})

    def sample_memory(self) -> None:
        try:
            pid = int((self.pool / "mount.pid").read_text().strip())
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass

    def record(self, what: str, plain: list[float], ours: list[float], unit: str,
               target: str) -> None:
        """One row: the medians of the runs (each run measured plain and DynamicFS one
        after the other), their ratio, and with several runs every figure."""
        p, o = statistics.median(plain), statistics.median(ours)
        ratio = o / p
        self.rows.append((what, f"{p:.2f} {unit}", f"{o:.2f} {unit}", f"{ratio:.2f}x", target))
        runs = ""
        if len(ours) > 1:
            runs = (f"; runs: plain {' / '.join(f'{v:.2f}' for v in plain)}, dynamicfs "
                    f"{' / '.join(f'{v:.2f}' for v in ours)}")
        print(f"  {what}: plain {p:.2f} {unit}, dynamicfs {o:.2f} {unit} "
              f"({ratio:.2f}x; target {target}{runs})", flush=True)

    # -- workloads --------------------------------------------------------------
    def sequential(self) -> None:
        mb = self.size / MiB
        plain_w: list[float] = []
        plain_r: list[float] = []
        ours: dict[str, tuple[list[float], list[float]]] = {
            "replicate:3": ([], []), "ec:4+2": ([], [])}
        for run in range(self.repeat):
            sh(f"cat {self.source} > /dev/null")
            # A throwaway write first: a large write into page-cache pages the machine
            # has not touched lately (after a cache drop, say) is often 2-4x slower
            # than the next, and the plain figure must not be that one.
            sh(f"dd if={self.source} of={self.plain}/warm-up bs=1M conv=fsync status=none")
            os.unlink(self.plain / "warm-up")
            settle(self.root)
            plain_w.append(mb / timed(lambda: sh(f"dd if={self.source} of={self.plain}/seq "
                                                 "bs=1M conv=fsync status=none")))
            drop_caches()
            plain_r.append(mb / timed(lambda: sh(f"dd if={self.plain}/seq of=/dev/null "
                                                 "bs=1M status=none")))
            os.unlink(self.plain / "seq")
            for policy, (writes, reads) in ours.items():
                name = policy.replace(":", "").replace("+", "_") + f"-{run}"
                self.mount()
                d = self.mnt / name
                d.mkdir()
                os.setxattr(d, "user.dynamicfs.policy", policy.encode())
                sh(f"cat {self.source} > /dev/null")
                settle(self.root)
                writes.append(mb / timed(lambda d=d: sh(
                    f"dd if={self.source} of={d}/seq bs=1M conv=fsync status=none")))
                self.unmount()
                drop_caches()
                self.mount()
                reads.append(mb / timed(lambda d=d: sh(
                    f"dd if={d}/seq of=/dev/null bs=1M status=none")))
                os.unlink(d / "seq")
                self.unmount()
        for policy, target in (("replicate:3", 0.35), ("ec:4+2", 0.45)):
            writes, reads = ours[policy]
            self.record(f"seq write {policy}", plain_w, writes, "MiB/s", f">= {target}x")
            self.record(f"seq read {policy}", plain_r, reads, "MiB/s", ">= 0.75x")

    def _create(self, base: Path, per_dir: int) -> None:
        data = os.urandom(4096)
        for d in range(100):
            sub = base / f"d{d:03d}"
            sub.mkdir()
            for i in range(per_dir):
                with open(sub / f"f{i:05d}", "wb") as f:
                    f.write(data)

    def _read_all(self, base: Path, per_dir: int) -> None:
        for d in range(100):
            for i in range(per_dir):
                with open(base / f"d{d:03d}" / f"f{i:05d}", "rb") as f:
                    f.read()

    def small_files(self) -> None:
        per_dir = self.files // 100
        results: dict[str, list[tuple[float, float, float, float]]] = {"plain": [], "dfs": []}
        null: list[float] = []
        for run in range(self.repeat):
            for label, base in (("plain", self.plain / f"small-{run}"),
                                ("dfs", self.mnt / f"small-{run}")):
                if label == "dfs":
                    self.mount()
                base.mkdir()
                settle(self.root)
                t_create = timed(lambda base=base: self._create(base, per_dir))
                if label == "dfs":
                    t_create += timed(self.sync)
                    self.unmount()  # for a cold `ls -lR`
                    drop_caches()
                    self.mount()
                else:
                    t_create += timed(os.sync)
                    drop_caches()
                t_ls = timed(lambda base=base: sh(f"ls -lR {base}"))
                t_read = timed(lambda base=base: self._read_all(base, per_dir))
                t_delete = timed(lambda base=base: shutil.rmtree(base))
                results[label].append((t_create, t_ls, t_read, t_delete))
                if label == "dfs":
                    self.unmount()
            null.append(self.null_create(per_dir, run))
        for i, what in enumerate(("create", "ls -lR (cold)", "read all", "delete")):
            target = "<= 10x" if what == "create" else "-"
            self.record(f"{self.files} x 4 KiB {what}", [r[i] for r in results["plain"]],
                        [r[i] for r in results["dfs"]], "s", target)
        self.record(f"{self.files} x 4 KiB create, do-nothing filesystem",
                    [r[0] for r in results["plain"]], null, "s",
                    "(floor of the FUSE session)")

    def null_create(self, per_dir: int, run: int) -> float:
        """The create loop on benchmarks/null_fuse.py (no flush, nothing stored)."""
        mnt = self.root / f"null-{run}"
        mnt.mkdir()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("null_fuse.py")),
                                 str(mnt)])
        try:
            deadline = time.monotonic() + 20
            while not os.path.ismount(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the do-nothing filesystem did not mount")
                time.sleep(0.05)
            base = mnt / "small"
            base.mkdir()
            settle(self.root)
            return timed(lambda: self._create(base, per_dir))
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            proc.wait(timeout=30)

    def tarball_extract(self) -> None:
        plain: list[float] = []
        ours: list[float] = []
        for run in range(self.repeat):
            out_plain = self.plain / f"tree-{run}"
            out_plain.mkdir()
            settle(self.root)
            plain.append(timed(lambda out_plain=out_plain: sh(
                f"tar -C {out_plain} -xf {self.tarball} && sync")))
            self.mount()
            out = self.mnt / f"tree-{run}"
            out.mkdir()
            settle(self.root)
            ours.append(timed(lambda out=out: (sh(f"tar -C {out} -xf {self.tarball}"),
                                               self.sync())))
            t_diff = timed(lambda out=out, out_plain=out_plain: sh(f"diff -r {out_plain} {out}"))
            self.unmount()
            print(f"  diff -r of the extracted trees: identical, {t_diff:.2f} s")
        files = sum(len(f) for _, _, f in os.walk(self.plain / "tree-0"))
        self.record(f"tar xf ({files} files)", plain, ours, "s", "<= 10x")

    def report(self) -> None:
        print("\n| work | plain | dynamicfs | ratio | target |")
        print("|---|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nmount daemon peak memory (VmHWM): {self.peak_kib / 1024:.0f} MiB "
              "(target < 300 MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="sequential file size")
    parser.add_argument("--files", type=int, default=10000, help="number of small files")
    parser.add_argument("--dir", default="/var/tmp", help="where to put disks (not tmpfs)")
    parser.add_argument("--skip", default="", help="comma list: seq,small,tar")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each workload, plain and DynamicFS one after the other "
                             "each time; the medians are compared (default 1)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="dynamicfs-bench-", dir=args.dir))
    bench = Bench(root, parse_size(args.size), args.files, args.repeat)
    skip = set(args.skip.split(","))
    try:
        bench.setup()
        if "seq" not in skip:
            bench.sequential()
        if "small" not in skip:
            bench.small_files()
        if "tar" not in skip:
            bench.tarball_extract()
        bench.report()
    finally:
        subprocess.run(["fusermount3", "-u", str(bench.mnt)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
