"""MetaStore transactions: savepoints roll back alone, group commit runs the before-commit
hooks first, and a failing hook keeps the whole transaction from ever committing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.errors import PoolError
from dynamicfs.meta.schema import SCHEMA_VERSION
from dynamicfs.meta.store import MetaStore


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[MetaStore]:
    store = MetaStore(tmp_path / "pool.db", create=True)
    store.migrate()
    yield store
    store.rollback()
    store.conn.close()


def events(path: Path) -> list[str]:
    """The event kinds as a fresh connection sees them (what is durable)."""
    other = MetaStore(path)
    try:
        return [r[0] for r in other.conn.execute("SELECT kind FROM events ORDER BY id")]
    finally:
        other.conn.close()


def add_event(meta: MetaStore, kind: str) -> None:
    with meta.write() as conn:
        conn.execute("INSERT INTO events (time, kind, detail) VALUES (0, ?, '')", (kind,))


def test_changes_become_visible_to_others_only_at_commit(meta: MetaStore) -> None:
    add_event(meta, "a")
    add_event(meta, "b")
    assert meta.dirty and events(meta.path) == []
    meta.commit()
    assert not meta.dirty and events(meta.path) == ["a", "b"]


def test_a_failing_write_rolls_back_only_itself(meta: MetaStore) -> None:
    add_event(meta, "kept")
    with pytest.raises(ValueError):
        with meta.write() as conn:
            conn.execute("INSERT INTO events (time, kind, detail) VALUES (0, 'lost', '')")
            raise ValueError
    meta.commit()
    assert events(meta.path) == ["kept"]


def test_after_commit_actions_run_after_the_commit_and_not_after_a_rollback(
        meta: MetaStore) -> None:
    ran: list[str] = []
    with meta.write():
        meta.after_commit(lambda: ran.append("kept"))
    with pytest.raises(ValueError):
        with meta.write():
            meta.after_commit(lambda: ran.append("dropped"))
            raise ValueError
    assert ran == []
    meta.commit()
    assert ran == ["kept"]


def test_before_commit_hooks_run_before_the_commit(meta: MetaStore) -> None:
    seen: list[list[str]] = []
    meta.before_commit.append(lambda: seen.append(events(meta.path)))
    add_event(meta, "a")
    meta.commit()
    assert seen == [[]]
    meta.commit()  # nothing to commit: no hook either
    assert seen == [[]]


def test_a_failing_before_commit_hook_means_the_transaction_never_commits(
        meta: MetaStore) -> None:
    add_event(meta, "durable")
    meta.commit()
    failing = [True]

    def hook() -> None:
        if failing[0]:
            raise OSError(5, "sync failed")

    ran: list[int] = []
    meta.before_commit.append(hook)
    add_event(meta, "never")
    with meta.write():
        meta.after_commit(lambda: ran.append(1))
    with pytest.raises(OSError):
        meta.commit()
    failing[0] = False
    meta.commit()
    add_event(meta, "later")
    meta.commit()
    assert events(meta.path) == ["durable", "later"]
    assert ran == []


def test_commit_inside_a_write_is_refused(meta: MetaStore) -> None:
    with meta.write():
        with pytest.raises(RuntimeError):
            meta.commit()


def test_a_newer_schema_is_refused(tmp_path: Path, meta: MetaStore) -> None:
    meta.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    other = MetaStore(meta.path)
    try:
        with pytest.raises(PoolError, match="newer"):
            other.migrate()
    finally:
        other.conn.close()


def test_a_missing_database_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(PoolError) as failure:
        MetaStore(tmp_path / "pool.db")
    assert "\n" not in str(failure.value)
