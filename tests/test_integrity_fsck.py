"""fsck: the metadata checked against itself and the disks; safe repairs made, the rest
listed with what to do."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest

from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.redundancy.policy import ec
from integrity_support import cli, data_of, fragment_paths, make_pool, read_file, write_files

FILES = {"dir/a": data_of("a", 100_000), "dir/sub/b": data_of("b", 3000),
         "c": data_of("c", 70_000)}


def fsck_json(capsys: pytest.CaptureFixture[str], pool_dir: Path,
              *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli("fsck", str(pool_dir), *args, "--json")
    return code, json.loads(capsys.readouterr().out)


def kinds(report: dict) -> set[str]:  # type: ignore[type-arg]
    return {p["kind"] for p in report["problems"]}


def sql(pool_dir: Path, *statements: str) -> None:
    conn = sqlite3.connect(pool_dir / "pool.db")
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()


def ino_of(pool_dir: Path, name: str) -> int:
    conn = sqlite3.connect(pool_dir / "pool.db")
    try:
        return int(conn.execute("SELECT ino FROM dentries WHERE name = ?",
                                (name.encode(),)).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, disks=7)
    write_files(pool_dir, FILES)
    return pool_dir


def test_fsck_of_a_sound_pool_finds_nothing(pool_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, r = fsck_json(capsys, pool_dir)
    assert code == 0 and r["clean"] and r["problems"] == []
    assert r["checked"]["inodes"] == 6 and r["checked"]["extents"] == 5
    assert r["checked"]["fragment_files"] == r["checked"]["fragments"] == 30


def test_fsck_repairs_broken_links_counters_and_leftovers(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Pool.open(pool_dir) as pool:
        with pool.meta.write() as conn:  # an extent recorded but never given to a file
            pool.store.store(conn, [(data_of("unused", 5000), ec(4, 2))])
        pool.meta.commit()
    a, c, sub = ino_of(pool_dir, "a"), ino_of(pool_dir, "c"), ino_of(pool_dir, "sub")
    sql(pool_dir,
        "INSERT INTO dentries (parent, name, ino) VALUES (1, x'67686f7374', 9999)",
        f"UPDATE inodes SET nlink = 5 WHERE ino = {a}",
        "UPDATE inodes SET nlink = 9 WHERE ino = 1",
        "UPDATE disks SET used = used + 12345 WHERE id = 2",
        "INSERT INTO inodes (mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
        f"VALUES ({stat.S_IFREG | 0o644}, 0, 0, 0, 0, 0, 0)",
        f"DELETE FROM dentries WHERE ino = {c}",
        f"DELETE FROM dentries WHERE ino = {sub}",
        f"INSERT INTO file_extents (ino, chunk, extent_id) SELECT 8888, 0, extent_id "
        f"FROM file_extents WHERE ino = {a} AND chunk = 0")
    code, r = fsck_json(capsys, pool_dir)
    assert code == 1 and r["repaired"] == 0
    assert kinds(r) == {"dangling-entry", "link-count", "used-counter", "unreferenced-extent",
                        "unlinked-inode", "unreachable-inode", "dangling-file-extents"}
    [link] = [p for p in r["problems"] if p["kind"] == "link-count" and p["paths"] == ["/dir/a"]]
    assert "link count 5, should be 1" in link["detail"]
    code, r = fsck_json(capsys, pool_dir, "--repair")
    assert code == 0 and r["remaining"] == 0 and r["repaired"] == len(r["problems"])
    code, r = fsck_json(capsys, pool_dir)
    assert code == 0 and r["problems"] == []
    assert read_file(pool_dir, "dir/a") == FILES["dir/a"]
    assert read_file(pool_dir, f"lost+found/#{c}") == FILES["c"]
    assert read_file(pool_dir, f"lost+found/#{sub}/b") == FILES["dir/sub/b"]
    with Pool.open(pool_dir) as pool:
        assert scrub(pool).clean


def test_fsck_rebuilds_a_missing_or_short_fragment_file(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Written by an open of its own, the file's last extent ends every segment it is
    # in: cutting one of those segments short cuts nothing else.
    write_files(pool_dir, {"dir/a2": FILES["dir/a"]})
    frags = fragment_paths(pool_dir, "dir/a2")
    frags[0][1].unlink()
    frags[-1][2].truncate(100)
    code, r = fsck_json(capsys, pool_dir)
    assert code == 1 and kinds(r) == {"fragment-file"}
    details = " ".join(p["detail"] for p in r["problems"])
    assert "missing" in details and "cut short" in details
    assert all(p["paths"] == ["/dir/a2"] for p in r["problems"])
    code, r = fsck_json(capsys, pool_dir, "--repair")
    assert code == 0 and r["repaired"] == 2
    code, r = fsck_json(capsys, pool_dir)
    assert code == 0
    assert read_file(pool_dir, "dir/a2") == FILES["dir/a"]


def test_fsck_lists_lost_data_it_cannot_repair_with_the_files_concerned(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = ino_of(pool_dir, "b")
    sql(pool_dir,
        f"DELETE FROM extents WHERE id = (SELECT extent_id FROM file_extents WHERE ino = {b})",
        "DELETE FROM fragments WHERE extent_id NOT IN (SELECT id FROM extents)")
    code, r = fsck_json(capsys, pool_dir, "--repair")
    assert code == 1 and r["remaining"] == 1
    [missing] = [p for p in r["problems"] if not p["repaired"]]
    assert missing["kind"] == "missing-extent" and missing["paths"] == ["/dir/sub/b"]
    assert "restore" in missing["hint"]
    capsys.readouterr()
    assert cli("fsck", str(pool_dir)) == 1
    out = capsys.readouterr().out
    assert "missing-extent" in out and "/dir/sub/b" in out and "1 left" in out


def test_fsck_reports_a_missing_disk_without_touching_its_records(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tmp_path / "disk3")
    code, r = fsck_json(capsys, pool_dir, "--repair")
    assert code == 1
    [problem] = r["problems"]
    assert problem["kind"] == "disk-unavailable" and "is missing" in problem["detail"]
    assert not (tmp_path / "disk3").exists()
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        assert conn.execute("SELECT count(*) FROM fragments WHERE disk_id = 4").fetchone()[0]
