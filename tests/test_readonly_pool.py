"""A pool directory on a read-only filesystem (a read-only bind mount here): the reports
(status, list-disks, list-extents, show-redundancy, health, what-if, audit-log and the
orphan reports) read it as it was last stored, with a note that nothing can change,
and leave every byte of it as it was; what would change the pool is refused in one
line (test_cli_bad_input). A pool left with a write-ahead log, or with an older schema,
is read through a private copy brought up to date, never changed in place."""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from admin_support import (
    assert_one_line_error,
    data_of,
    db_snapshot,
    make_pool,
    read_only_view,
    run,
    sql,
    tree,
    write_files,
)
from dynamicfs.engine.pool import Pool
from dynamicfs.meta.schema import SCHEMA_VERSION
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO

READ_ONLY_NOTE = "is read-only: showing the pool as last stored; nothing in it can change"
REPORTS = {
    "status": [],
    "list-disks": [],
    "list-extents": [],
    "show-redundancy": ["--file", "/big"],
    "health": [],
    "what-if": ["--fail", "1"],
    "audit-log": [],
    "orphan-stats": [],
    "detect-orphans": [],
}


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, [None] * 4)
    write_files(pool_dir, {"/big": data_of("big", 700_000), "/a/small": data_of("s", 3000)},
                dir_policies={"/a": "replicate:2"})
    return pool_dir


# What changes from one moment to the next whatever the pool: the clock, and the free
# space of the filesystem the test's disks share with everything else.
VOLATILE = {"time", "capacity", "free", "raw_capacity", "raw_free", "usable"}


def _steady(value: object) -> object:
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def _report(capsys: pytest.CaptureFixture[str], command: str,
            pool: Path) -> tuple[int, object, str]:
    code, out, err = run(capsys, command, pool, *REPORTS[command], "--json")
    return code, _steady(json.loads(out.replace(str(pool), "POOL"))), err


@pytest.mark.parametrize("command", sorted(REPORTS))
def test_a_report_of_a_read_only_pool_is_the_report_of_the_pool(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    expected = _report(capsys, command, pool_dir)
    before = (db_snapshot(pool_dir), sql(pool_dir, "SELECT epoch FROM pool"), tree(pool_dir))
    with read_only_view(pool_dir, tmp_path / "ro") as view:
        code, report, err = _report(capsys, command, view)
    assert (code, report) == expected[:2]
    assert err.strip() == f"note: pool directory {view} {READ_ONLY_NOTE}"
    assert "Traceback" not in expected[2]
    # Nothing written: not even the epoch every read-write open bumps.
    assert (db_snapshot(pool_dir), sql(pool_dir, "SELECT epoch FROM pool"),
            tree(pool_dir)) == before


def _extents_of(capsys: pytest.CaptureFixture[str], pool: Path) -> list[str]:
    code, out, _ = run(capsys, "list-extents", pool, "--json")
    assert code == 0
    return sorted({row["file"] for row in json.loads(out)})


def _die_after(work: Callable[[], None]) -> None:
    """Run `work` in a child process that then exits without closing anything, as a
    crash (or a kill -9 of a mount daemon) would: what SQLite committed stays in its
    write-ahead log (pool.db-wal)."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _snapshots() -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob("dynamicfs-meta-*"))


def test_a_pool_left_with_its_write_ahead_log_is_read_with_it(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def write_late() -> None:
        pool = Pool.open(pool_dir)
        ns = Namespace(pool)
        attr = ns.create(ROOT_INO, b"late", 0o644, 0, 0)
        ns.write(attr.ino, 0, data_of("late", 5000))
        ns.fsync(attr.ino)
        ns.release(attr.ino)
        ns.sync_all()

    _die_after(write_late)
    wal = pool_dir / "pool.db-wal"
    assert wal.stat().st_size > 0
    # The database file alone does not have the file yet: only its log does.
    conn = sqlite3.connect(f"file:{pool_dir / 'pool.db'}?immutable=1", uri=True)
    count = "SELECT COUNT(*) FROM dentries WHERE name = ?"
    assert conn.execute(count, (b"small",)).fetchone() == (1,)
    assert conn.execute(count, (b"late",)).fetchone() == (0,)
    conn.close()
    log_bytes = wal.read_bytes()
    with read_only_view(pool_dir, tmp_path / "ro") as view:
        assert _extents_of(capsys, view) == ["/a/small", "/big", "/late"]
    assert wal.read_bytes() == log_bytes
    assert not _snapshots()


def test_a_read_only_pool_of_a_newer_schema_is_refused_and_leaves_no_copy(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def bump_schema() -> None:
        conn = sqlite3.connect(pool_dir / "pool.db")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        conn.commit()

    _die_after(bump_schema)
    assert (pool_dir / "pool.db-wal").stat().st_size > 0  # so a private copy is made
    with read_only_view(pool_dir, tmp_path / "ro") as view:
        code, _, err = run(capsys, "status", view)
        assert_one_line_error(code, err)
        assert f"newer than this DynamicFS ({SCHEMA_VERSION}); upgrade DynamicFS" in err
        assert not _snapshots()


def test_a_pool_of_an_older_schema_is_read_without_upgrading_it(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Take the database back to the schema before the last migration, as an older
    # DynamicFS left it.
    conn = sqlite3.connect(pool_dir / "pool.db")
    conn.executescript("DROP INDEX fragments_segment; ALTER TABLE fragments DROP COLUMN segment;"
                       "ALTER TABLE fragments DROP COLUMN offset;"
                       f"PRAGMA user_version={SCHEMA_VERSION - 1};")
    conn.close()
    database = (pool_dir / "pool.db").read_bytes()
    with read_only_view(pool_dir, tmp_path / "ro") as view:
        assert _extents_of(capsys, view) == ["/a/small", "/big"]
        for command in REPORTS:
            code, _, err = run(capsys, command, view, *REPORTS[command], "--json")
            assert code == 0, (command, err)
        code, out, _ = run(capsys, "status", view, "--json")
    assert json.loads(out)["extents"] == len(sql(pool_dir, "SELECT id FROM extents"))
    assert (pool_dir / "pool.db").read_bytes() == database
    assert sql(pool_dir, "PRAGMA user_version") == [(SCHEMA_VERSION - 1,)]


def test_scrub_and_fsck_check_a_read_only_pool_and_keep_nothing(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lost = sorted((tmp_path / "disk1" / "segments").iterdir())
    assert lost
    for segment in lost:
        segment.unlink()
    on_disk1 = sql(pool_dir, "SELECT COUNT(DISTINCT extent_id) FROM fragments WHERE disk_id = 2")
    before = (db_snapshot(pool_dir), sql(pool_dir, "SELECT epoch FROM pool"), tree(pool_dir))
    with read_only_view(pool_dir, tmp_path / "ro") as view:
        code, out, err = run(capsys, "scrub", view, "--json")
        scrubbed = json.loads(out)
        assert err.strip() == f"note: pool directory {view} {READ_ONLY_NOTE}"
        code, out, err = run(capsys, "fsck", view, "--json")
        checked = json.loads(out)
        assert code == 1 and err.strip() == f"note: pool directory {view} {READ_ONLY_NOTE}"
        # In words, the next step waits for the filesystem to be writable again.
        for command, step in (("scrub", "'dynamicfs repair'"), ("fsck", "'dynamicfs fsck "
                                                                        "--repair'")):
            code, out, _ = run(capsys, command, view)
            assert code == 1
            assert f"next: once the pool directory is writable again, {step}" in out
        for repair in (["scrub", "--repair"], ["fsck", "--repair"]):
            code, _, err = run(capsys, repair[0], view, repair[1])
            assert code == 1 and err.strip().startswith(
                f"dynamicfs: error: pool directory {view} is read-only, and {repair[0]} would "
                "change the pool; remount it read-write")
    assert [(scrubbed["checked"], scrubbed["under_redundant"], scrubbed["unreadable"])] == \
        [(len(sql(pool_dir, "SELECT id FROM extents")), *on_disk1[0], 0)]
    assert {p["state"] for p in scrubbed["problems"]} == {"under-redundant"}
    assert len(checked["problems"]) == len(sql(
        pool_dir, "SELECT id FROM fragments WHERE disk_id = 2"))
    # Its findings went nowhere: no scrub state, no problems, no repair queue, no audit.
    assert (db_snapshot(pool_dir), sql(pool_dir, "SELECT epoch FROM pool"),
            tree(pool_dir)) == before
    assert sql(pool_dir, "SELECT COUNT(*) FROM scrub_state") == [(0,)]
