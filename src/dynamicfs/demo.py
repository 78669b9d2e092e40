"""The demo: a pool of six unequal disks survives two disk failures, byte for byte.

Run by `./scripts/demo`. It builds a pool under a scratch directory, mounts it, copies
the Python standard library and a large file in, unmounts, fails two disks (one marked
failed by the operator, one destroyed by deleting its directory), mounts again with cold
caches, checks every file byte for byte through the mount, adds two new disks while
mounted (an ec:4+2 extent needs six healthy disks for full redundancy), lets probe-disks
find the dead disk, rebuilds redundancy, prints `status`, remounts, checks every file
again, scrubs (which must find nothing), and exits non-zero if anything did not match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

CAPACITIES = ["96M", "128M", "160M", "192M", "224M", "256M"]
EXCLUDE = ("./site-packages", "./test", "__pycache__", "./config-*", "./idlelib", "./tkinter")


class Demo:
    def __init__(self, scratch: Path, keep: bool) -> None:
        self.scratch = scratch
        self.keep = keep
        self.pool = scratch / "pool"
        self.mnt = scratch / "mnt"
        self.source = scratch / "source"
        self.started = time.monotonic()
        self.mounted = False

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def dfs(self, *args: str, check: bool = True, quiet: bool = False) -> str:
        proc = subprocess.run([sys.executable, "-m", "dynamicfs", *args], text=True,
                              capture_output=True)
        if check and proc.returncode != 0:
            raise SystemExit(f"demo: 'dynamicfs {' '.join(args)}' failed: "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
        if not quiet and proc.stdout.strip():
            print(proc.stdout.rstrip())
        return proc.stdout

    def run(self) -> int:
        self.say(f"scratch directory {self.scratch}")
        self.dfs("init", str(self.pool), quiet=True)
        disks = []
        for i, cap in enumerate(CAPACITIES, 1):
            disk = self.scratch / f"disk{i}"
            disk.mkdir()
            self.dfs("add-disk", str(self.pool), str(disk), "--capacity", cap, quiet=True)
            disks.append(disk)
        self.say(f"pool with 6 directory disks of {', '.join(CAPACITIES)}")
        self.prepare_source()
        self.mount()
        self.say("copying the Python standard library and a 24 MiB file in (tar | tar)")
        subprocess.run(f"tar -C {self.source} -cf - . | tar -C {self.mnt} -xf -", shell=True,
                       check=True)
        layout = subprocess.run(["getfattr", "--only-values", "-n", "user.dynamicfs.layout",
                                 str(self.mnt / "big.bin")], capture_output=True, text=True)
        if layout.returncode == 0:
            first = layout.stdout.splitlines()[0] if layout.stdout else ""
            self.say(f"big.bin is erasure coded: {first}")
        self.unmount()
        self.say("failing two disks: disk 2 by the operator (fail-disk), disk 5 destroyed "
                 "(its directory deleted)")
        self.dfs("fail-disk", str(self.pool), "2", quiet=True)
        shutil.rmtree(disks[4])
        self.mount()
        self.say("checking every file byte for byte through the mount (cold caches)")
        bad = self.verify()
        for name in ("disk7", "disk8"):
            new = self.scratch / name
            new.mkdir()
            self.dfs("add-disk", str(self.pool), str(new), "--capacity", "256M", quiet=True)
        self.say("added disks 7 and 8 while mounted, to replace the two failed ones")
        probed = self.dfs("probe-disks", str(self.pool), "--json", quiet=True)
        self.say("probe-disks: " + _failed_disks(probed))
        self.dfs("repair", str(self.pool), check=False, quiet=True)
        self.say("repair rebuilt the lost fragments onto the remaining and the new disks")
        self.dfs("status", str(self.pool))
        self.unmount()
        self.mount()
        self.say("after remount, checking every file again (cold caches)")
        bad += self.verify()
        scrub = subprocess.run([sys.executable, "-m", "dynamicfs", "scrub", str(self.pool)],
                               capture_output=True, text=True)
        self.say("scrub: " + (scrub.stdout.strip().splitlines() or ["(no output)"])[-1])
        if scrub.returncode != 0:
            bad += 1
        self.unmount()
        if bad:
            self.say(f"FAILED: {bad} problems")
            return 1
        self.say("every file matched, before and after the rebuild")
        return 0

    def prepare_source(self) -> None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        self.source.mkdir()
        excludes = " ".join(f"--exclude='{e}'" for e in EXCLUDE)
        subprocess.run(f"tar -C {stdlib} {excludes} -cf - . | tar -C {self.source} -xf -",
                       shell=True, check=True)
        with open(self.source / "big.bin", "wb") as f:
            f.write(os.urandom(24 * 1024 * 1024))
        files = sum(len(f) for _, _, f in os.walk(self.source))
        self.say(f"source tree: {files} files")

    def mount(self) -> None:
        self.mnt.mkdir(exist_ok=True)
        self.dfs("mount", str(self.pool), str(self.mnt), quiet=True)
        self.mounted = True
        self.say(f"mounted at {self.mnt}")

    def unmount(self) -> None:
        self.dfs("unmount", str(self.mnt), quiet=True)
        self.mounted = False
        self.say("unmounted (all data and metadata flushed)")

    def verify(self, quiet: bool = False) -> int:
        """Compare every file, symlink and mode; return the number of mismatches."""
        bad = 0
        count = 0
        for root, dirs, files in os.walk(self.source):
            rel = Path(root).relative_to(self.source)
            for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
                src, dst = Path(root) / name, self.mnt / rel / name
                count += 1
                try:
                    if src.is_symlink():
                        ok = dst.is_symlink() and os.readlink(src) == os.readlink(dst)
                    else:
                        ok = (_digest(src) == _digest(dst)
                              and src.stat().st_mode == dst.stat().st_mode)
                except OSError as exc:
                    ok = False
                    print(f"  {rel / name}: {exc.strerror}")
                if not ok:
                    bad += 1
                    print(f"  MISMATCH {rel / name}")
        if not quiet:
            self.say(f"checked {count} files: {count - bad} identical, {bad} different")
        return bad

    def cleanup(self) -> None:
        if self.mounted:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if not self.keep:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _failed_disks(probe_json: str) -> str:
    try:
        rows = json.loads(probe_json)
        failed = [f"disk {r['id']} {r['before']} -> {r['after']} ({r['reason']})"
                  for r in rows if r.get("after") != r.get("before")]
    except (ValueError, KeyError, TypeError):
        return "done"
    return "; ".join(failed) or "no change"


def _digest(path: Path) -> bytes:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.digest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--dir", default="/var/tmp", help="where to make the scratch directory")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dynamicfs-demo-", dir=args.dir))
    demo = Demo(scratch, args.keep)
    try:
        return demo.run()
    finally:
        demo.cleanup()


if __name__ == "__main__":
    sys.exit(main())
