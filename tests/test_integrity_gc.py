"""Garbage: orphan fragments (no fragments row for their disk), empty segment files and
extents no file uses are found, and removed once older than the grace period."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.maintenance.gc import cleanup_orphans, find_orphans, parse_age
from dynamicfs.redundancy.policy import ec
from integrity_support import cli, data_of, fragment_paths, make_pool, read_file, write_files

DATA = data_of("kept", 150_000)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli(*args, "--json")
    return code, json.loads(capsys.readouterr().out)


def crash_leftovers(pool_dir: Path) -> int:
    """Fragments written but never recorded, as a crash before the commit leaves them."""
    with Pool.open(pool_dir) as pool:
        written = pool.store.write([(data_of("lost", 64 * 1024), ec(4, 2)),
                                    (data_of("lost2", 1000), ec(4, 2))])
        return sum(len(w.info.fragments) for w in written)


def unused_extents(pool_dir: Path) -> list[int]:
    """Extents recorded but never mapped into a file."""
    with Pool.open(pool_dir) as pool:
        with pool.meta.write() as conn:
            ids = pool.store.store(conn, [(data_of("unused", 5000), ec(4, 2))])
        pool.meta.commit()
        return ids


def age_files(root: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in root.rglob("*.seg"):
        os.utime(path, (then, then))


def count_fragment_files(tmp_path: Path) -> int:
    """Live fragment records on every disk."""
    return sum(1 for d in tmp_path.glob("disk*") for _ in DirectoryDisk(d).list_fragments())


def count_segments(tmp_path: Path) -> int:
    return sum(1 for _ in tmp_path.glob("disk*/segments/*.seg"))


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, disks=7)
    write_files(pool_dir, {"kept": DATA})
    return pool_dir


def test_fragments_left_by_a_crash_are_orphans_removed_after_the_grace_period(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, segments = count_fragment_files(tmp_path), count_segments(tmp_path)
    leftovers = crash_leftovers(pool_dir)
    code, r = run_json(capsys, "detect-orphans", str(pool_dir))
    assert code == 1
    assert len(r["orphans"]) == leftovers == 12 and r["extents"] == []
    assert all(Path(o["path"].rpartition("@")[0]).exists() and o["size"] > 0
               for o in r["orphans"])
    crash_segments = count_segments(tmp_path) - segments
    assert crash_segments > 0
    code, r = run_json(capsys, "cleanup-orphans", str(pool_dir))  # grace: 1 hour
    assert code == 0 and r["deleted"] == 0 and r["kept_young"] == leftovers
    age_files(tmp_path, 2 * 3600)
    code, r = run_json(capsys, "cleanup-orphans", str(pool_dir))
    assert code == 0 and r["deleted"] == leftovers and r["deleted_bytes"] > 0
    # The segments the crashed open wrote held nothing else: they are gone too.
    assert r["segments_removed"] == crash_segments
    assert count_fragment_files(tmp_path) == before
    assert count_segments(tmp_path) == segments
    code, r = run_json(capsys, "detect-orphans", str(pool_dir))
    assert code == 0 and r["orphans"] == []
    assert read_file(pool_dir, "kept") == DATA


def test_cleanup_with_older_than_0s_removes_orphans_and_unused_extents_at_once(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = count_fragment_files(tmp_path)
    crash_leftovers(pool_dir)
    [unused] = unused_extents(pool_dir)
    code, r = run_json(capsys, "orphan-stats", str(pool_dir))
    assert r["orphans"] == 12 and r["extents"] == 1 and r["extent_bytes"] == 5000
    assert sum(d["orphans"] for d in r["disks"]) == 12
    assert all(d["older_than_grace"] == 0 for d in r["disks"])
    code, r = run_json(capsys, "cleanup-orphans", str(pool_dir), "--older-than", "0s")
    assert code == 0 and r["deleted"] == 12 and r["extents_freed"] == 1
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        assert conn.execute("SELECT count(*) FROM extents WHERE id = ?",
                            (unused,)).fetchone()[0] == 0
        used = conn.execute("SELECT sum(used) FROM disks").fetchone()[0]
        stored = conn.execute("SELECT sum(size) FROM fragments").fetchone()[0]
    assert used == stored
    assert count_fragment_files(tmp_path) == before
    assert read_file(pool_dir, "kept") == DATA


def test_a_fragment_copied_to_another_disk_is_an_orphan_there_only(
        pool_dir: Path, tmp_path: Path) -> None:
    source = fragment_paths(pool_dir, "kept")[0][0]
    stray_disk = next(d for d in sorted(tmp_path.glob("disk*"))
                      if not any(str(p.path).startswith(str(d) + "/")
                                 for p in fragment_paths(pool_dir, "kept")[0]))
    # The fragment's record, copied into a segment file of its own on another disk.
    stray = DirectoryDisk(stray_disk).segment_path(source.ref.id)
    stray.write_bytes(source.read_bytes())
    with Pool.open(pool_dir) as pool:
        scan = find_orphans(pool)
        assert [o.path for o in scan.orphans] == [f"{stray}@0"]
        report = cleanup_orphans(pool, older_than=0)
    assert report.deleted == 1 and report.segments_removed == 1
    assert source.exists() and not stray.exists()
    assert read_file(pool_dir, "kept") == DATA


def test_fragments_of_the_current_open_are_never_taken_for_orphans(pool_dir: Path) -> None:
    with Pool.open(pool_dir) as pool:
        written = pool.store.write([(data_of("in flight", 20_000), ec(4, 2))])
        scan = find_orphans(pool)
        assert scan.orphans == [] and scan.current == 6
        report = cleanup_orphans(pool, older_than=0)
        assert report.deleted == 0 and report.kept_current == 6
        assert all(pool.backends[r.disk_id].fragment_exists(r.ref)
                   for w in written for r in w.info.fragments)
        pool.store.discard(written)


def test_ages_are_parsed_with_units_and_a_bad_one_is_a_one_line_error(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_age("10m") == 600 and parse_age("2h") == 7200 and parse_age("0s") == 0
    assert parse_age("90") == 90 and parse_age("1.5d") == 1.5 * 86400
    with pytest.raises(DynamicFSError):
        parse_age("soon")
    capsys.readouterr()
    assert cli("cleanup-orphans", str(pool_dir), "--older-than", "soon") == 1
    err = capsys.readouterr().err
    assert err.startswith("dynamicfs: error: malformed age 'soon'") and len(err.splitlines()) == 1
