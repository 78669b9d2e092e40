"""What the FUSE tests share: build a pool, mount it the way a user does (`dynamicfs
mount`, detached), unmount it even when a test fails, and compare directory trees."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.disks.faulty import ENV_VAR as FAULTS_ENV
from dynamicfs.engine.pool import Pool

PY = sys.executable
CLI_TIMEOUT = 120


def cli(*args: str | os.PathLike[str], check: bool = True,
        timeout: float = CLI_TIMEOUT, cwd: str | os.PathLike[str] = "/"
        ) -> subprocess.CompletedProcess[str]:
    """Run `dynamicfs ARGS` in a fresh process, as a user would (in `cwd`). Disk faults
    set in the environment (DYNAMICFS_FAULTS) reach mount daemons only: a command that
    opens the pool itself would run on the faulty disks too."""
    env = dict(os.environ)
    if str(args[0]) != "mount":
        env.pop(FAULTS_ENV, None)
    done = subprocess.run([PY, "-m", "dynamicfs.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"dynamicfs {' '.join(map(str, args))} failed "
                             f"({done.returncode}): {done.stderr.strip()}")
    return done


def make_pool(root: Path, disks: int = 6, *, capacity: int | None = None,
              **init_args: object) -> tuple[Path, list[Path]]:
    """A pool at root/pool with `disks` directory disks root/disk{i}, each capped at
    `capacity` bytes if given."""
    pool_dir = root / "pool"
    init_pool(pool_dir, **init_args)  # type: ignore[arg-type]
    paths = []
    with Pool.open(pool_dir) as pool:
        for i in range(disks):
            path = root / f"disk{i}"
            path.mkdir()
            add_disk(pool, path, capacity=capacity)
            paths.append(path)
    return pool_dir, paths


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == target for line in f)


def daemon_pid(pool_dir: Path) -> int | None:
    try:
        return int(json.loads((pool_dir / "mount.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"mount daemon {pid} still running"
        time.sleep(0.05)


@dataclass
class Mount:
    """A pool and where it is mounted; `mount()`/`unmount()` go through the CLI."""

    pool: Path
    mnt: Path
    disks: list[Path]
    options: list[str] = field(default_factory=list)
    pid: int | None = None

    def mount(self) -> None:
        cli("mount", self.pool, self.mnt, *[a for o in self.options for a in ("-o", o)])
        assert is_mounted(self.mnt)
        self.pid = daemon_pid(self.pool)
        assert self.pid is not None

    def unmount(self) -> None:
        cli("unmount", self.mnt)
        assert not is_mounted(self.mnt)
        if self.pid is not None:
            assert not alive(self.pid), "unmount returned before the daemon exited"
        self.pid = None

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def force_unmount(self) -> None:
        """Teardown after a failure: detach the mount and stop the daemon we started."""
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        pid = self.pid or daemon_pid(self.pool)
        if pid is not None and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_gone(pid, 30)
            except AssertionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pid = None

    def __truediv__(self, name: str) -> Path:
        return self.mnt / name


@contextlib.contextmanager
def mounted_pool(root: Path, disks: int = 6, options: list[str] | None = None,
                 **init_args: object) -> Iterator[Mount]:
    """A fresh pool mounted at root/mnt; always unmounted at the end."""
    pool_dir, disk_paths = make_pool(root, disks, **init_args)
    mnt = root / "mnt"
    mnt.mkdir()
    m = Mount(pool_dir, mnt, disk_paths, list(options or []))
    m.mount()
    try:
        yield m
    except BaseException:
        m.force_unmount()
        raise
    else:
        try:
            if is_mounted(m.mnt):
                m.unmount()
        finally:
            m.force_unmount()


# ---------------------------------------------------------------------- tree snapshots
def xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)
            if n.startswith("user.") and not n.startswith("user.dynamicfs.")}


def snapshot(root: Path, *, times: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything cp -a / tar / rsync -aHX promise to keep, per relative path.

    Hard links appear as the sorted group of names sharing an inode; directory sizes,
    atimes and ctimes are left out (they legitimately differ between filesystems).
    """
    out: dict[str, tuple[object, ...]] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = _digest(path)
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            else:
                content = None
            mtime = st.st_mtime_ns if times and not stat.S_ISLNK(st.st_mode) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_size if kind != stat.S_IFDIR
                        else None, content, mtime, tuple(sorted(xattrs(path).items())))
    for names in groups.values():
        for name in names:
            out[name] = (*out[name], tuple(sorted(names)))
    return out


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def diff_r(a: Path, b: Path) -> None:
    """`diff -r --no-dereference` agrees the trees have the same content.

    diff cannot compare FIFOs and says so even when both sides are one; that is fine.
    """
    done = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                          capture_output=True, text=True)
    said = [line for line in (done.stdout + done.stderr).splitlines()
            if not re.fullmatch(r"File .* is a fifo while file .* is a fifo", line)]
    assert said == [], "\n".join(said[-20:])


def have(program: str) -> bool:
    return shutil.which(program) is not None
