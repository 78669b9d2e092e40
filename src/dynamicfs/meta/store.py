"""MetaStore: the one SQLite connection of a pool, and how changes become durable.

Rules:
- One connection per open pool, shared by threads under `lock` (an RLock).
- Every change runs inside `write()`: a SAVEPOINT inside one long transaction.
  Changes are group-committed by `commit()` (on fsync, a timer, unmount, or at the
  end of an offline command), so many small operations share one fsync.
- `commit()` first runs the before-commit hooks, which make every fragment named by
  the transaction durable (DESIGN invariant 3), then COMMITs (WAL, synchronous=FULL),
  then runs the after-commit actions (freeing the fragments it dropped). If a hook
  fails, the whole transaction is rolled back and the error raised: its changes are
  lost, as in a crash just before the commit.
- An after-commit action registered inside a `write()` that rolls back is dropped.
- SQLite may roll the whole transaction back on its own (a full disk, an I/O error):
  that counts as a rollback (the after-rollback hooks run; the changes are lost, as in
  a crash), and a full disk is raised as NoSpaceError (ENOSPC), so that the next
  change starts a fresh transaction once there is room again.
- `read_only=True` is for a pool directory on a read-only filesystem, where SQLite can
  neither write the database nor create the files of its write-ahead log: the database
  is opened as immutable, or, when a write-ahead log was left behind (the pool was not
  closed cleanly) or the schema is older than this DynamicFS's, a private copy of both
  is opened, brought up to date and read instead (see `_snapshot`). Either way nothing
  can change: every write() raises PoolError. With `scratch=True` as well, the private
  copy is always made and may be written: for checks (scrub, fsck) that keep their own
  bookkeeping in the metadata; what they write is dropped with the copy at close().
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamicfs.errors import NoSpaceError, PoolError
from dynamicfs.meta.schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "pool.db"


class MetaStore:
    def __init__(self, path: Path, *, create: bool = False, read_only: bool = False,
                 scratch: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.scratch = scratch and read_only
        self._snapshot_dir: Path | None = None
        self._readers: list[sqlite3.Connection] = []  # from open_reader(): closed by close()
        if not create and not self.path.exists():
            raise PoolError(f"{self.path.parent} has no metadata database ({DB_NAME}); "
                            "run 'dynamicfs recover-metadata' or check the path")
        conn: sqlite3.Connection | None = None
        try:
            if read_only:
                conn = self._connect_read_only()
            else:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA cache_size=-65536")
            self.conn = conn
        except BaseException as exc:
            if conn is not None:
                conn.close()  # no descriptor left open on a file the caller may remove
            self._drop_snapshot()
            if not isinstance(exc, sqlite3.DatabaseError):
                raise
            if not read_only and _nearly_full(self.path.parent):  # no room for its WAL
                raise PoolError(f"cannot open the metadata database {self.path}: its "
                                "filesystem is full; free some space there") from None
            raise PoolError(f"metadata database {self.path} is unreadable ({exc}); "
                            "run 'dynamicfs recover-metadata'") from None
        self.lock = threading.RLock()
        self._in_tx = False
        self._depth = 0
        self.before_commit: list[Callable[[], None]] = []
        self.presync: list[Callable[[], None]] = []
        self.after_rollback: list[Callable[[], None]] = []
        self._after_commit: list[Callable[[], None]] = []
        self.commits = 0

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that reads the database without writing anything beside it
        (see the module docstring); every statement that would change it fails."""
        wal = self.path.with_name(self.path.name + "-wal")
        if self.scratch:
            return self._snapshot(wal)
        conn = None
        if not (wal.exists() and wal.stat().st_size > 0):
            conn = _connect_uri(self.path.absolute(), "immutable=1")
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
                conn.close()
                conn = None
        if conn is None:
            conn = self._snapshot(wal)
        conn.execute("PRAGMA query_only=1")
        return conn

    def open_reader(self) -> sqlite3.Connection:
        """Another connection to this pool's metadata that only reads (it sees what is
        committed): of the database itself, or, for a read-only store, of what the store
        reads (the database as immutable, or its private copy)."""
        if self._snapshot_dir is not None:
            path, flag = self._snapshot_dir / self.path.name, "mode=ro"
        else:
            path, flag = self.path.absolute(), "immutable=1" if self.read_only else "mode=ro"
        conn = _connect_uri(path, flag)
        self._readers.append(conn)
        return conn

    def _snapshot(self, wal: Path) -> sqlite3.Connection:
        """Copy the database and its write-ahead log into a private directory and open
        the copy: SQLite replays the log there (the commits it holds are the newest
        metadata), and the copy's schema is brought up to date. Removed by close()."""
        try:
            self._snapshot_dir = Path(tempfile.mkdtemp(prefix="dynamicfs-meta-"))
            copy = self._snapshot_dir / self.path.name
            shutil.copyfile(self.path, copy)
            if wal.exists():
                shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        except OSError as exc:
            raise PoolError(f"cannot copy the metadata of read-only pool {self.path.parent} "
                            f"to a temporary directory to read it there ({exc.strerror}); "
                            "set TMPDIR to a writable directory with room") from None
        conn = sqlite3.connect(copy, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        try:
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _drop_snapshot(self) -> None:
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None

    # -- schema --------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema up to date, one migration per transaction (a read-only
        store's copy was brought up to date when it was opened)."""
        with self.lock:
            if self.read_only:
                _check_not_newer(self.schema_version())
            else:
                _migrate(self.conn)

    # -- transactions ----------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One atomic change inside the current group transaction."""
        with self.lock:
            self._check_writable()
            if not self._in_tx:
                self.conn.execute("BEGIN IMMEDIATE")
                self._in_tx = True
            self._depth += 1
            name = f"op{self._depth}"
            mark = len(self._after_commit)
            try:
                self.conn.execute(f"SAVEPOINT {name}")
                try:
                    yield self.conn
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute(f"ROLLBACK TO {name}")
                        self.conn.execute(f"RELEASE {name}")
                        del self._after_commit[mark:]
                    raise
                else:
                    self.conn.execute(f"RELEASE {name}")
            except sqlite3.Error as exc:
                _raise_if_full(exc, self.path)
                raise
            finally:  # before the error reaches the caller
                self._depth -= 1
                self._check_rolled_back()

    def begin(self) -> None:
        """Open the group transaction, so that the next commit() runs its hooks.

        For callers that keep changes in memory and write them from a before-commit hook.
        """
        with self.lock:
            self._check_writable()
            if not self._in_tx:
                self.conn.execute("BEGIN IMMEDIATE")
                self._in_tx = True

    def _check_writable(self) -> None:
        if self.read_only and not self.scratch:
            raise PoolError(f"pool directory {self.path.parent} is read-only, so nothing "
                            "in the pool can change; remount it read-write")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            yield self.conn

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the current transaction has committed (dropped on rollback)."""
        with self.lock:
            self._after_commit.append(action)

    @property
    def dirty(self) -> bool:
        return self._in_tx

    def commit(self) -> None:
        """Make every change so far durable, fragments first (invariant 3).

        The presync hooks run first without the lock, so the bulk of the fragment syncing
        does not stop other threads; the before-commit hooks then finish the job under
        the lock (a sync still in flight makes them wait; a failed one makes them fail).
        """
        if self._in_tx and self.presync:
            try:
                for hook in self.presync:
                    hook()
            except BaseException:
                with self.lock:
                    self.rollback()
                raise
        with self.lock:
            if not self._in_tx:
                return
            if self._depth:
                raise RuntimeError("commit() inside write()")
            try:
                for hook in self.before_commit:
                    hook()
            except BaseException:
                # Fragments this transaction names may not be durable, and a later sync
                # cannot prove they are: the transaction must never commit (invariant 3).
                self.rollback()
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._check_rolled_back()
                _raise_if_full(exc, self.path)
                raise
            self._in_tx = False
            self.commits += 1
            actions, self._after_commit = self._after_commit, []
        for action in actions:
            action()

    def _check_rolled_back(self) -> None:
        """After an error: if SQLite rolled the whole transaction back by itself, say so
        (the hooks run as for rollback())."""
        if self._in_tx and not self.conn.in_transaction:
            self.rollback()

    def rollback(self) -> None:
        with self.lock:
            if self._in_tx:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                self._in_tx = False
                self._after_commit = []
                for hook in self.after_rollback:
                    hook()

    def close(self) -> None:
        with self.lock:
            try:
                self.commit()
            finally:
                self.conn.close()
                for reader in self._readers:
                    reader.close()
                self._readers = []
                self._drop_snapshot()


def _connect_uri(path: Path, flag: str) -> sqlite3.Connection:
    """A connection to the database at `path` opened with a URI parameter (`mode=ro`,
    `immutable=1`)."""
    uri = f"file:{urllib.parse.quote(str(path))}?{flag}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def _check_not_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise PoolError(f"metadata schema {version} is newer than this DynamicFS "
                        f"({SCHEMA_VERSION}); upgrade DynamicFS")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema of the database behind `conn` up to date, one migration per
    transaction."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    _check_not_newer(version)
    for target in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[target]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={target + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _nearly_full(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _raise_if_full(exc: sqlite3.Error, path: Path) -> None:
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        raise NoSpaceError(f"no space left for the metadata in {path.parent}; free some "
                           "space on its filesystem") from None


def _statements(script: str) -> list[str]:
    parts = [p.strip() for p in script.split(";")]
    return [p for p in parts if p]
