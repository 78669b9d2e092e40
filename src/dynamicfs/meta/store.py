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
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dynamicfs.errors import NoSpaceError, PoolError
from dynamicfs.meta.schema import MIGRATIONS, SCHEMA_VERSION

DB_NAME = "pool.db"


class MetaStore:
    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise PoolError(f"{self.path.parent} has no metadata database ({DB_NAME}); "
                            "run 'dynamicfs recover-metadata' or check the path")
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA cache_size=-65536")
            self.conn = conn
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()  # no descriptor left open on a file the caller may remove
            if _nearly_full(self.path.parent):  # SQLite cannot start its WAL there
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

    # -- schema --------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema up to date, one migration per transaction."""
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise PoolError(f"metadata schema {version} is newer than this DynamicFS "
                            f"({SCHEMA_VERSION}); upgrade DynamicFS")
        for target in range(version, SCHEMA_VERSION):
            with self.lock:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[target]):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version={target + 1}")
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise

    # -- transactions ----------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One atomic change inside the current group transaction."""
        with self.lock:
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
            if not self._in_tx:
                self.conn.execute("BEGIN IMMEDIATE")
                self._in_tx = True

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
            self.commit()
            self.conn.close()


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
