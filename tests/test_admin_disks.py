"""Disk health through the CLI: set-disk-health, fail-disk (refusing to make files
unreadable unless forced) and probe-disks against real damage: a missing directory, a
missing or foreign label, a read-only or full filesystem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from admin_support import (
    assert_one_line_error,
    data_of,
    db_snapshot,
    make_pool,
    read_files,
    read_only_view,
    run,
    run_program,
    sql,
    write_files,
)
from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import init_pool
from dynamicfs.disks.label import LABEL_NAME
from dynamicfs.engine.pool import Pool


def _probe(capsys: pytest.CaptureFixture[str], pool_dir: Path) -> dict[int, dict[str, str]]:
    code, out, err = run(capsys, "probe-disks", pool_dir, "--json")
    assert code == 0, err
    return {row["id"]: row for row in json.loads(out)}


def _disk(pool_dir: Path, disk_id: int) -> tuple[str, str]:
    state, reason = sql(pool_dir, "SELECT state, reason FROM disks WHERE id = ?", (disk_id,))[0]
    return str(state), str(reason)


@pytest.mark.parametrize("ref", ["id", "path", "relative path", "uuid", "uuid prefix"])
def test_set_disk_health_finds_a_disk_by_id_path_or_uuid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        ref: str) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3)
    uuid = sql(pool_dir, "SELECT uuid FROM disks WHERE id = 2")[0][0]
    monkeypatch.chdir(tmp_path)
    given = {"id": "2", "path": str(tmp_path / "disk1"), "relative path": "disk1",
             "uuid": uuid, "uuid prefix": uuid[:8]}[ref]
    code, out, err = run(capsys, "set-disk-health", "--pool", pool_dir, "--disk", given,
                         "--state", "suspect", "--reason", "smart warnings")
    assert code == 0, err
    assert out.strip() == f"disk 2 {tmp_path / 'disk1'} is suspect (smart warnings)"
    assert _disk(pool_dir, 2) == ("suspect", "smart warnings")


def test_a_suspect_disk_gets_no_new_fragments(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, policy="replicate:3")
    assert run(capsys, "set-disk-health", pool_dir, "4", "suspect")[0] == 0
    write_files(pool_dir, {"/f": data_of("f", 500_000)})
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 4") == [(0,)]
    assert sql(pool_dir, "SELECT count(*) FROM fragments") > [(0,)]


def test_fail_disk_refuses_to_make_files_unreadable_unless_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2, policy="replicate:2")
    files = {"/docs/a": data_of("a", 100_000), "/b": data_of("b", 10_000)}
    write_files(pool_dir, files)
    code, out, err = run(capsys, "fail-disk", pool_dir, "1", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "failed"
    assert read_files(pool_dir, list(files)) == files

    before = db_snapshot(pool_dir)
    code, _, err = run(capsys, "fail-disk", pool_dir, tmp_path / "disk1")
    assert_one_line_error(code, err)
    assert "/docs/a" in err and "/b" in err and "--force" in err
    assert db_snapshot(pool_dir) == before

    code, _, err = run(capsys, "fail-disk", "--pool", pool_dir, "--disk", "2", "--force")
    assert code == 0, err
    assert _disk(pool_dir, 2) == ("failed", "failed by operator")
    status = json.loads(run(capsys, "status", pool_dir, "--json")[1])
    assert status["unreadable"] > 0
    assert status["files_at_risk"] == ["/b", "/docs/a"]


def test_probe_fails_a_disk_whose_directory_is_missing_and_heals_it_on_return(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    (tmp_path / "disk1").rename(tmp_path / "elsewhere")
    rows = _probe(capsys, pool_dir)
    assert rows[2]["before"] == "healthy" and rows[2]["after"] == "failed"
    assert "is missing" in rows[2]["reason"]
    assert _disk(pool_dir, 2)[0] == "failed"
    assert rows[1]["after"] == "healthy"

    (tmp_path / "elsewhere").rename(tmp_path / "disk1")
    rows = _probe(capsys, pool_dir)
    assert rows[2]["after"] == "healthy"
    assert _disk(pool_dir, 2) == ("healthy", "")


def test_probe_fails_a_disk_without_its_label(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    label = tmp_path / "disk0" / LABEL_NAME
    saved = label.read_bytes()
    label.unlink()
    rows = _probe(capsys, pool_dir)
    assert rows[1]["after"] == "failed" and "no label" in rows[1]["reason"]
    label.write_bytes(saved)
    assert _probe(capsys, pool_dir)[1]["after"] == "healthy"


def test_probe_fails_a_disk_carrying_another_pools_label(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    init_pool(tmp_path / "other-pool")
    (tmp_path / "other-disk").mkdir()
    with Pool.open(tmp_path / "other-pool") as other:
        add_disk(other, tmp_path / "other-disk")
    shutil.copy(tmp_path / "other-disk" / LABEL_NAME, tmp_path / "disk0" / LABEL_NAME)
    rows = _probe(capsys, pool_dir)
    assert rows[1]["after"] == "failed"
    assert "another pool" in rows[1]["reason"]


def test_probe_fails_a_disk_that_cannot_be_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    disk = tmp_path / "disk1"
    with read_only_view(disk, disk):
        rows = _probe(capsys, pool_dir)
        assert rows[2]["after"] == "failed"
        assert "read/write probe failed" in rows[2]["reason"]
        assert "Read-only file system" in rows[2]["reason"]
    assert _probe(capsys, pool_dir)[2]["after"] == "healthy"


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_probe_makes_a_full_disk_suspect_and_heals_it_when_space_returns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None])
    with _tmpfs(tmp_path / "small", "1m") as small:
        assert run(capsys, "add-disk", pool_dir, small)[0] == 0
        filler = _fill(small)
        rows = _probe(capsys, pool_dir)
        assert rows[2]["after"] == "suspect"
        assert "No space left on device" in rows[2]["reason"]
        filler.unlink()
        assert _probe(capsys, pool_dir)[2]["after"] == "healthy"


def test_disks_on_one_filesystem_share_its_free_space_and_add_disk_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Uncapped disks on one filesystem count its free space once between them, not once
    per disk; a disk on a filesystem of its own counts its own, and
    add-disk warns when a new disk shares a filesystem (and so a device) with others."""
    pool_dir = make_pool(tmp_path, [None] * 3)
    with _tmpfs(tmp_path / "own", "64m") as own:
        code, out, err = run(capsys, "add-disk", pool_dir, own)
        assert code == 0 and "note" not in out, err
        (tmp_path / "fourth").mkdir()
        code, out, err = run(capsys, "add-disk", pool_dir, tmp_path / "fourth")
        assert code == 0, err
        assert "note: disk 5 is on the same filesystem as disk(s) 1, 2, 3" in out
        code, out, err = run(capsys, "list-disks", pool_dir, "--json")
        assert code == 0, err
        rows = {r["id"]: r for r in json.loads(out)}
        assert rows[1]["shares_filesystem_with"] == [2, 3, 5]
        assert rows[4]["shares_filesystem_with"] == []
        vfs = os.statvfs(tmp_path)
        shared = sum(rows[i]["capacity"] - rows[i]["used"] for i in (1, 2, 3, 5))
        assert abs(shared - vfs.f_bavail * vfs.f_frsize) < 64 * 2**20
        assert 60 * 2**20 < rows[4]["capacity"] <= 64 * 2**20
        code, out, err = run(capsys, "status", pool_dir, "--json")
        assert code == 0 and json.loads(out)["shared_filesystems"] == [[1, 2, 3, 5]], err
        assert run(capsys, "fail-disk", pool_dir, "2")[0] == 0
        code, out, err = run(capsys, "status", pool_dir)
        assert code == 0, err
        assert "note: disks 1, 3, 5 are on one filesystem, so one failure of its device " \
               "fails them together" in out


def test_init_on_a_full_filesystem_leaves_nothing_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failed init leaves no half-made pool.db: the next init, once there is room,
    succeeds, instead of finding "a pool" whose database is empty."""
    with _tmpfs(tmp_path / "small", "1m") as small:
        filler = _fill(small)
        code, _, err = run(capsys, "init", small / "pool")
        assert_one_line_error(code, err)
        assert "full" in err
        assert sorted(p.name for p in small.iterdir()) == ["filler"]
        filler.unlink()
        # In separate processes: an in-process command keeps the pool's log open.
        assert run_program("init", small / "pool").returncode == 0
        assert run_program("status", small / "pool").returncode == 0


def test_a_good_probe_does_not_undo_an_operators_decision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    assert run(capsys, "fail-disk", pool_dir, "1")[0] == 0
    rows = _probe(capsys, pool_dir)
    assert rows[1]["before"] == rows[1]["after"] == "failed"
    assert _disk(pool_dir, 1) == ("failed", "failed by operator")


def test_probe_disks_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    (tmp_path / "disk1").rename(tmp_path / "gone")
    code, out, _ = run(capsys, "probe-disks", "--pool", pool_dir)
    assert code == 0
    line = next(line for line in out.splitlines() if str(tmp_path / "disk1") in line)
    assert "healthy" in line and "failed" in line and "is missing" in line


def test_add_disk_creates_the_segment_directory(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2)
    disk = tmp_path / "new-disk"
    disk.mkdir()
    code, _, err = run(capsys, "add-disk", pool_dir, disk)
    assert code == 0, err
    assert (disk / "segments").is_dir() and not any((disk / "segments").iterdir())
    # A segment directory removed behind the pool's back comes back at the next write
    # (the disk still carries its label).
    shutil.rmtree(disk / "segments")
    files = {f"/f{i}": os.urandom(3000 + i) for i in range(40)}
    write_files(pool_dir, files)
    assert any((disk / "segments").glob("*.seg"))
    assert read_files(pool_dir, list(files)) == files
