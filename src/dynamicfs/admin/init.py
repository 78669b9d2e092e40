"""`init`: create a pool directory with an empty metadata database and a root directory."""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from pathlib import Path

from dynamicfs.errors import PoolError
from dynamicfs.meta.schema import FORMAT_VERSION
from dynamicfs.meta.store import DB_NAME, MetaStore
from dynamicfs.redundancy.codecs import RS_BACKEND
from dynamicfs.redundancy.policy import parse_policy

DEFAULT_EXTENT_SIZE = 1024 * 1024
MIN_EXTENT_SIZE = 4096
MAX_EXTENT_SIZE = 64 * 1024 * 1024
ROOT_INO = 1


def init_pool(path: Path | str, extent_size: int = DEFAULT_EXTENT_SIZE,
              default_policy: str = "auto") -> dict[str, object]:
    pool_dir = Path(path).absolute()
    policy = parse_policy(default_policy)
    if not MIN_EXTENT_SIZE <= extent_size <= MAX_EXTENT_SIZE:
        raise PoolError(f"extent size {extent_size} is out of range: use 4KiB to 64MiB")
    if (pool_dir / DB_NAME).exists():
        raise PoolError(f"{pool_dir} is already a DynamicFS pool; pick another directory")
    if pool_dir.exists() and not pool_dir.is_dir():
        raise PoolError(f"{pool_dir} exists and is not a directory")
    if pool_dir.is_dir() and any(pool_dir.iterdir()):
        raise PoolError(f"{pool_dir} is not empty; a pool needs an empty or new directory")
    new_dir = not pool_dir.exists()
    try:
        pool_dir.mkdir(parents=True, exist_ok=True)
        probe = pool_dir / ".dynamicfs-init"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PoolError(f"cannot create pool in {pool_dir}: {exc.strerror}") from None
    try:
        return _create_metadata(pool_dir, extent_size, str(policy))
    except BaseException:
        # Leave nothing that looks like a pool: a half-made pool.db would make the next
        # init refuse the directory and every command advise recover-metadata.
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                (pool_dir / (DB_NAME + suffix)).unlink()
        if new_dir:
            with contextlib.suppress(OSError):
                pool_dir.rmdir()
        raise


def _create_metadata(pool_dir: Path, extent_size: int, policy: str) -> dict[str, object]:
    meta = MetaStore(pool_dir / DB_NAME, create=True)
    try:
        meta.migrate()
        pool_uuid = str(uuid.uuid4())
        now = time.time()
        now_ns = time.time_ns()
        with meta.write() as conn:
            conn.execute("INSERT INTO pool (id, uuid, format_version, extent_size, default_policy, "
                         "codec, created, epoch) VALUES (1, ?, ?, ?, ?, ?, ?, 0)",
                         (pool_uuid, FORMAT_VERSION, extent_size, policy, RS_BACKEND, now))
            conn.execute("INSERT INTO inodes (ino, mode, uid, gid, nlink, size, atime_ns, "
                         "mtime_ns, ctime_ns) VALUES (?, ?, ?, ?, 2, 0, ?, ?, ?)",
                         (ROOT_INO, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(),
                          now_ns, now_ns, now_ns))
            conn.execute("INSERT INTO events (time, kind, detail) VALUES (?, 'init', ?)",
                         (now, f'{{"uuid": "{pool_uuid}"}}'))
        meta.commit()
    finally:
        meta.conn.close()
    return {"pool": str(pool_dir), "uuid": pool_uuid, "extent_size": extent_size,
            "default_policy": policy, "format_version": FORMAT_VERSION}
