"""Opening a pool: the pool directory, its lock, its metadata and its disks.

A pool directory holds `pool.db` (metadata), `pool.lock` (held exclusively by whoever
has the pool open: the mount daemon or an offline command), `mount.json` (where it is
mounted, while it is), the control socket and the logs.

Every open bumps the pool's epoch and commits it before anything else, so ids handed
out in this open ((epoch << 32) + n) can never collide with fragments left by an
earlier open that crashed (DESIGN invariant 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dynamicfs.disks import health
from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.errors import PoolBusyError, PoolError
from dynamicfs.meta.schema import FORMAT_VERSION
from dynamicfs.meta.store import DB_NAME, MetaStore
from dynamicfs.mounttable import FSTYPE, mount_holding
from dynamicfs.redundancy.codecs import RS_BACKEND
from dynamicfs.redundancy.policy import AUTO, Policy, parse_policy, resolve_auto

LOCK_NAME = "pool.lock"
MOUNT_INFO = "mount.json"
ID_BITS = 32


@dataclass
class DiskInfo:
    id: int
    uuid: str
    path: str
    tier: str
    state: str
    reason: str
    capacity: int | None
    used: int
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    added: float = 0.0
    # Live counters since the pool was opened (not stored).
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def readable(self) -> bool:
        return self.state in health.READABLE

    @property
    def writable(self) -> bool:
        return self.state in health.WRITABLE


DISK_COLUMNS = ("id, uuid, path, tier, state, reason, capacity, used, read_errors, "
                "write_errors, checksum_errors, added")


@dataclass(frozen=True)
class PoolConfig:
    uuid: str
    format_version: int
    extent_size: int
    default_policy: str
    codec: str
    created: float
    epoch: int


def is_pool(path: Path) -> bool:
    return (Path(path) / DB_NAME).is_file()


def not_a_pool(pool_dir: Path) -> PoolError:
    """The error for a directory without pool.db: a pool that lost it, or no pool at all."""
    # pool.lock is left by every open; disks.json by every metadata copy.
    if (pool_dir / LOCK_NAME).exists() or (pool_dir / "disks.json").exists():
        return PoolError(f"{pool_dir} has lost its metadata database ({DB_NAME}); restore it "
                         f"from the copies on its disks with 'dynamicfs recover-metadata "
                         f"{pool_dir}'")
    found = mount_holding(Path(os.path.realpath(pool_dir)))
    if found is not None and found[1].fstype == FSTYPE:
        place, entry = found
        return PoolError(f"{pool_dir} is in the DynamicFS mount at {place}, not a pool "
                         f"directory; that mount's pool is {entry.source}")
    return PoolError(f"{pool_dir} is not a DynamicFS pool (no {DB_NAME}); create one with "
                     f"'dynamicfs init {pool_dir}'")


def check_pool_dir(path: Path | str) -> Path:
    """The absolute pool directory, or a PoolError saying why it is not one."""
    pool_dir = Path(path).absolute()
    if not pool_dir.exists():
        raise PoolError(f"pool {pool_dir} does not exist; create it with "
                        f"'dynamicfs init {pool_dir}'")
    if not is_pool(pool_dir):
        raise not_a_pool(pool_dir)
    return pool_dir


def directory_writable(pool_dir: Path) -> bool:
    """False when the pool directory's filesystem is mounted read-only (or this user may
    not write there): the pool can then only be read (Pool.open's read_only)."""
    try:
        if os.statvfs(pool_dir).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return True  # let opening the pool say what is wrong
    return os.access(pool_dir, os.W_OK)


def mount_info(path: Path) -> dict[str, object] | None:
    try:
        return dict(json.loads((Path(path) / MOUNT_INFO).read_text()))
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _command_line() -> str:
    """This process's command as a user typed it (`dynamicfs scrub /srv/pool`), from
    /proc/self/cmdline, whose first words are the interpreter's for a script."""
    try:
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    words = [a.decode(errors="replace") for a in argv]
    if words and os.path.basename(words[0]).startswith("python"):
        words = words[1:]
        if words[:1] == ["-m"]:
            words = words[1:]
    if words:
        first = os.path.basename(words[0])
        words[0] = "dynamicfs" if first.startswith("dynamicfs") else first
    return " ".join(words).replace("\n", " ")[:200]


class PoolLock:
    """An exclusive flock on `pool.lock`, held for as long as the pool is open; shared
    (`shared=True`) by processes that only read a pool whose directory is read-only."""

    def __init__(self, pool_dir: Path, *, shared: bool = False) -> None:
        self.path = pool_dir / LOCK_NAME
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            if self.shared:
                fd = os.open(self.path, os.O_RDONLY)
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            if self.shared:
                return  # never opened read-write, so never mounted: nothing to share
            raise PoolError(f"cannot open {self.path}: no such file") from None
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise PoolError(f"pool directory {self.path.parent} is read-only; "
                                "remount it read-write or run as its owner") from None
            raise PoolError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            info = mount_info(self.path.parent)
            if info:
                raise PoolBusyError(f"pool {self.path.parent} is mounted at "
                                    f"{info.get('mountpoint')} (pid {info.get('pid')}); "
                                    "unmount it first or run the command while it is mounted "
                                    "through its control socket") from None
            raise PoolBusyError(f"pool {self.path.parent} is in use by {holder}; wait for it "
                                "to finish (or stop it), then run this again") from None
        self.fd = fd
        if self.shared:
            return
        # Who holds it, for the refusal above (informational: the flock is the lock).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_command_line()}\n".encode(), 0)

    @staticmethod
    def _holder(fd: int) -> str:
        """'`COMMAND` (pid N)' from the lock file, or a plain description."""
        try:
            pid, _, command = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
        except OSError:
            pid = ""
        if not pid.isdigit() or not pid_alive(int(pid)):  # not written yet: a new holder
            return "another dynamicfs process"
        return f"'{command}' (pid {pid})" if command else f"pid {pid}"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Pool:
    """An open pool. Use `Pool.open(path)`; close() commits and releases the lock."""

    def __init__(self, path: Path, meta: MetaStore, lock: PoolLock | None) -> None:
        self.path = path
        self.meta = meta
        self._lock = lock
        self.config = self._load_config()
        if self.config.codec != RS_BACKEND:
            raise PoolError(f"pool {path} was written with erasure codec {self.config.codec!r}, "
                            f"this DynamicFS uses {RS_BACKEND!r}; use a matching DynamicFS")
        self.disks: dict[int, DiskInfo] = {}
        self.backends: dict[int, DirectoryDisk] = {}
        self._id_lock = threading.Lock()
        self._next_extent_id = self.config.epoch << ID_BITS
        self._next_fragment_id = self.config.epoch << ID_BITS
        self.reload_disks()
        from dynamicfs.engine.store import ExtentStore

        self.store = ExtentStore(self)

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, *, lock: bool = True, read_only: bool = False,
             scratch: bool = False) -> Pool:
        """Open the pool at `path`. `read_only`: for a pool directory on a read-only
        filesystem (see `directory_writable`); the pool is then read as it was last
        stored and nothing in it can change (MetaStore's read_only). `scratch`, with
        `read_only`: the metadata may be written, into a private copy dropped at close
        (for a check's own bookkeeping; MetaStore's scratch)."""
        pool_dir = check_pool_dir(path)
        pool_lock = PoolLock(pool_dir, shared=read_only) if lock else None
        if pool_lock:
            pool_lock.acquire()
        try:
            meta = MetaStore(pool_dir / DB_NAME, read_only=read_only, scratch=scratch)
            try:
                _check_format(meta)
                meta.migrate()
                if not read_only:
                    _bump_epoch(meta)
            except BaseException:
                meta.close()
                raise
            return cls(pool_dir, meta, pool_lock)
        except BaseException:
            if pool_lock:
                pool_lock.release()
            raise

    @property
    def read_only(self) -> bool:
        """Opened read-only (see open()): nothing in the pool can change."""
        return self.meta.read_only

    def _load_config(self) -> PoolConfig:
        with self.meta.read() as conn:
            row = conn.execute("SELECT uuid, format_version, extent_size, default_policy, codec, "
                               "created, epoch FROM pool WHERE id = 1").fetchone()
        if row is None:
            raise PoolError(f"{self.path} has an empty metadata database; "
                            "run 'dynamicfs recover-metadata'")
        return PoolConfig(*row)

    def close(self) -> None:
        try:
            self.meta.commit()  # syncs pending fragments through the store's executor
            self.store.close()
            self.meta.close()
            for backend in self.backends.values():
                backend.close()
        finally:
            if self._lock:
                self._lock.release()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- disks ---------------------------------------------------------------
    def reload_disks(self) -> None:
        with self.meta.read() as conn:
            rows = conn.execute(f"SELECT {DISK_COLUMNS} FROM disks ORDER BY id").fetchall()
        disks = {row[0]: DiskInfo(*row) for row in rows}
        for disk_id, info in disks.items():
            old = self.disks.get(disk_id)
            if old is not None:  # keep live counters the metadata has not caught up with
                info.used = max(info.used, old.used) if old.path == info.path else info.used
                info.reads, info.writes = old.reads, old.writes
                info.bytes_read, info.bytes_written = old.bytes_read, old.bytes_written
            if disk_id not in self.backends or str(self.backends[disk_id].root) != info.path:
                if disk_id in self.backends:
                    self.backends[disk_id].close()
                self.backends[disk_id] = DirectoryDisk(info.path)
        for gone in set(self.backends) - set(disks):
            self.backends.pop(gone).close()
        store = getattr(self, "store", None)
        for disk_id, info in disks.items():
            old = self.disks.get(disk_id)
            if store is not None and old is not None and old.state != info.state:
                store.forget_errors(disk_id)
        self.disks = disks

    def healthy_disks(self) -> list[DiskInfo]:
        return [d for d in self.disks.values() if d.writable]

    def disk_by_ref(self, ref: str) -> DiskInfo | None:
        """Find a disk by id, UUID (or its prefix) or path."""
        ref = str(ref)
        for d in self.disks.values():
            if ref in (str(d.id), d.uuid, d.path) or (len(ref) >= 8 and d.uuid.startswith(ref)):
                return d
        try:
            real = str(Path(ref).resolve())
        except OSError:
            return None
        for d in self.disks.values():
            if d.path == real:
                return d
        return None

    # -- ids and policies -----------------------------------------------------
    def new_extent_id(self) -> int:
        with self._id_lock:
            self._next_extent_id += 1
            return self._next_extent_id

    def new_fragment_id(self) -> int:
        with self._id_lock:
            self._next_fragment_id += 1
            return self._next_fragment_id

    def resolve_policy(self, policy: str | None, file_size: int) -> Policy:
        """A concrete policy for data of a file of `file_size` bytes."""
        parsed = parse_policy(policy or self.config.default_policy)
        if parsed == AUTO:
            return resolve_auto(file_size, len(self.healthy_disks()))
        assert isinstance(parsed, Policy)
        return parsed

    def record_event(self, kind: str, detail: dict[str, object]) -> None:
        with self.meta.write() as conn:
            conn.execute("INSERT INTO events (time, kind, detail) VALUES (?, ?, ?)",
                         (time.time(), kind, json.dumps(detail, default=str)))


def _check_format(meta: MetaStore) -> None:
    try:
        row = meta.conn.execute("SELECT format_version FROM pool WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise PoolError(f"metadata database is unreadable ({exc}); "
                        "run 'dynamicfs recover-metadata'") from None
    if row and row[0] > FORMAT_VERSION:
        raise PoolError(f"pool format {row[0]} is newer than this DynamicFS supports "
                        f"({FORMAT_VERSION}); upgrade DynamicFS")


def _bump_epoch(meta: MetaStore) -> None:
    try:
        with meta.write() as conn:
            conn.execute("UPDATE pool SET epoch = epoch + 1 WHERE id = 1")
        meta.commit()
    except sqlite3.OperationalError as exc:
        meta.rollback()
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise PoolError(f"pool directory {meta.path.parent} is read-only; "
                            "remount it read-write") from None
        raise PoolError(f"cannot update metadata: {exc}") from None
