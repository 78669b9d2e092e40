"""A disk that is a directory: fragment files under `<root>/fragments/<xx>/`.

Owns invariant 2 at the file level (fragments are created with O_EXCL and never
rewritten) and the durability half of invariant 3: `sync()` makes written fragment
files and their directory entries durable, batching many files into one syncfs(2)
of the disk's filesystem.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dynamicfs.disks.label import LABEL_NAME, Label, LabelError, read_label

FRAGMENT_DIR = "fragments"
_PROBE_NAME = ".dynamicfs-probe"
# Above this many files in one batch, one syncfs() beats one fsync() per file.
SYNCFS_THRESHOLD = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class ProbeResult:
    state: str | None  # None: fine; otherwise the health state the disk deserves
    reason: str


class DirectoryDisk:
    """Fragment storage in a directory. Thread-safe: every method may run concurrently."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.fragment_root = self.root / FRAGMENT_DIR
        self._known_dirs: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DirectoryDisk({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------
    def _fanout(self, fragment_id: int) -> str:
        return f"{fragment_id & 0xFF:02x}"

    def fragment_path(self, fragment_id: int) -> Path:
        return self.fragment_root / self._fanout(fragment_id) / f"{fragment_id:016x}.frag"

    def prepare(self) -> None:
        """Create the fragment directory and its 256 fan-out directories, durably, so
        the first writes to a new disk do not each pay for a mkdir."""
        self.fragment_root.mkdir(exist_ok=True)
        for n in range(256):
            (self.fragment_root / f"{n:02x}").mkdir(exist_ok=True)
        for d in (self.fragment_root, self.root):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self._known_dirs.update(f"{n:02x}" for n in range(256))

    # -- fragments -----------------------------------------------------------
    def write_fragment(self, fragment_id: int, header: bytes, payload: bytes | memoryview) -> None:
        """Create the fragment file (not yet durable: call sync())."""
        sub = self._fanout(fragment_id)
        if sub not in self._known_dirs:
            # Never `parents=True`: a disk whose directory vanished (an unmounted mount
            # point, say) must fail the write, not grow a copy on the parent filesystem.
            try:
                (self.fragment_root / sub).mkdir(exist_ok=True)
            except FileNotFoundError:
                self.fragment_root.mkdir(exist_ok=True)
                (self.fragment_root / sub).mkdir(exist_ok=True)
            with self._lock:
                self._known_dirs.add(sub)
        fd = os.open(self.fragment_path(fragment_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            total = len(header) + len(payload)
            written = os.writev(fd, [header, payload])
            if written != total:  # short write: finish it the slow way
                rest = (header + bytes(payload))[written:]
                while rest:
                    n = os.write(fd, rest)
                    rest = rest[n:]
        finally:
            os.close(fd)

    def read_fragment(self, fragment_id: int) -> bytes:
        with open(self.fragment_path(fragment_id), "rb", buffering=0) as f:
            return f.read()

    def delete_fragment(self, fragment_id: int) -> None:
        try:
            os.unlink(self.fragment_path(fragment_id))
        except FileNotFoundError:
            pass

    def fragment_exists(self, fragment_id: int) -> bool:
        return self.fragment_path(fragment_id).exists()

    def list_fragments(self) -> Iterator[tuple[int, float]]:
        """Every fragment file on the disk: (fragment id, mtime)."""
        if not self.fragment_root.is_dir():
            return
        for sub in os.scandir(self.fragment_root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                if name.endswith(".frag"):
                    try:
                        yield int(name[:-5], 16), entry.stat().st_mtime
                    except (ValueError, FileNotFoundError):
                        continue

    def sync(self, fragment_ids: Iterable[int]) -> None:
        """Make these fragment files and their directory entries durable."""
        ids = list(fragment_ids)
        if not ids:
            return
        if len(ids) > SYNCFS_THRESHOLD:
            self.sync_filesystem()
            return
        dirs = set()
        for fid in ids:
            path = self.fragment_path(fid)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(path.parent)
        dirs.add(self.fragment_root)
        for d in dirs:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def sync_filesystem(self) -> None:
        """syncfs(2) of the disk's filesystem: everything written there becomes durable."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    # -- the disk as a whole ---------------------------------------------------
    def device_id(self) -> int:
        return os.stat(self.root).st_dev

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def read_label(self) -> Label:
        return read_label(self.root)

    def probe(self, pool_uuid: str, disk_uuid: str) -> ProbeResult:
        """Check the disk is present, labelled for this pool and readable/writable."""
        if not self.root.is_dir():
            return ProbeResult("failed", f"directory {self.root} is missing")
        try:
            label = self.read_label()
        except LabelError as exc:
            return ProbeResult("failed", f"{LABEL_NAME}: {exc}")
        if label.pool_uuid != pool_uuid or label.disk_uuid != disk_uuid:
            return ProbeResult("failed", "label belongs to another pool or disk")
        probe = self.root / _PROBE_NAME
        data = os.urandom(4096)
        try:
            with open(probe, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with open(probe, "rb") as f:
                back = f.read()
            os.unlink(probe)
        except OSError as exc:
            state = "suspect" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "failed"
            return ProbeResult(state, f"read/write probe failed: {exc.strerror}")
        if back != data:
            return ProbeResult("suspect", "read/write probe returned different bytes")
        return ProbeResult(None, "ok")
