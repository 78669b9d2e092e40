"""scrub: every fragment read and checked; problems reported with their files, repaired
with --repair, and an interrupted scrub resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.admin.integrity import scrub_status
from dynamicfs.disks.label import LABEL_NAME
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO
from integrity_support import (
    cli,
    data_of,
    flip_byte,
    fragment_paths,
    make_pool,
    read_file,
    write_files,
)

FILES = {
    "big/one.bin": data_of("one", 5 * 64 * 1024),  # 5 extents
    "big/two.bin": data_of("two", 3 * 64 * 1024 + 100),  # 4 extents
    "small.txt": data_of("small", 3000),  # 1 extent
}
EXTENTS = 10


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli(*args, "--json")
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    pool_dir = make_pool(tmp_path, disks=7)  # ec:4+2 and a spare disk
    write_files(pool_dir, FILES)
    return pool_dir


def all_read_back(pool_dir: Path) -> bool:
    return all(read_file(pool_dir, path) == data for path, data in FILES.items())


def test_scrub_of_a_healthy_pool_checks_every_extent_and_exits_0(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 0
    assert r["clean"] and r["finished"] and not r["resumed"]
    assert (r["checked"], r["healthy"]) == (EXTENTS, EXTENTS)
    assert r["under_redundant"] == r["repaired"] == r["unreadable"] == 0
    assert r["bytes"] == sum(len(d) for d in FILES.values())
    assert r["fragment_bytes"] > r["bytes"]  # ec:4+2 stores 1.5x plus headers
    assert r["problems"] == []


def test_scrub_reports_deleted_truncated_and_flipped_fragments_with_their_files(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = fragment_paths(pool_dir, "big/one.bin")
    one[0][0].unlink()
    one[1][3].write_bytes(one[1][3].read_bytes()[:50])  # the rest reads as zeros
    flip_byte(one[2][5])
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 1
    assert not r["clean"]
    assert (r["healthy"], r["under_redundant"], r["unreadable"]) == (EXTENTS - 3, 3, 0)
    details = sorted(p["detail"] for p in r["problems"])
    assert all(p["state"] == "under-redundant" for p in r["problems"])
    assert all(p["paths"] == ["/big/one.bin"] for p in r["problems"])
    assert any("fragment 0" in d and "missing" in d for d in details)
    assert any("fragment 3" in d and "header checksum mismatch" in d for d in details)
    assert any("fragment 5" in d and "payload checksum mismatch" in d for d in details)
    assert all(d.startswith("5 of 6 fragments good") for d in details)
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        queued = {r[0] for r in conn.execute("SELECT extent_id FROM repair_queue")}
    assert queued == {p["extent_id"] for p in r["problems"]}


def test_scrub_names_files_that_cannot_be_read_like_zpool_status(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for fragment in fragment_paths(pool_dir, "big/two.bin")[1][:3]:
        fragment.unlink()
    capsys.readouterr()
    assert cli("scrub", str(pool_dir)) == 1
    out = capsys.readouterr().out
    assert "1 unreadable" in out
    assert "cannot be read" in out
    assert "/big/two.bin" in out.split("cannot be read")[1]
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 1
    [problem] = r["problems"]
    assert problem["state"] == "unreadable" and problem["paths"] == ["/big/two.bin"]
    assert problem["detail"].startswith("3 of 4 needed fragments good")


def test_scrub_repair_rebuilds_damaged_fragments_and_the_next_scrub_is_clean(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = fragment_paths(pool_dir, "big/one.bin"), fragment_paths(pool_dir, "big/two.bin")
    one[0][1].unlink()
    one[0][2].unlink()  # two lost: still k=4 left
    flip_byte(two[3][0], 100)
    (fragment_paths(pool_dir, "small.txt")[0][4]).write_bytes(b"")
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 0 and r["clean"]
    assert (r["repaired"], r["under_redundant"], r["unreadable"]) == (3, 0, 0)
    assert {p["state"] for p in r["problems"]} == {"repaired"}
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 0 and r["healthy"] == EXTENTS and r["problems"] == []
    assert all_read_back(pool_dir)


def test_an_interrupted_scrub_resumes_where_it_stopped_unless_restarted(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fragment_paths(pool_dir, "small.txt")[0][0].unlink()
    with Pool.open(pool_dir) as pool:
        first = scrub(pool, batch=3, stop_after=3)
    assert first.finished is None and first.checked == 3
    with Pool.open(pool_dir) as pool:
        status = scrub_status(pool)
    assert status is not None and status["finished"] is None and status["checked"] == 3
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert r["resumed"] and r["finished"]
    assert r["checked"] == EXTENTS  # 3 before the interruption, 7 now
    assert (r["healthy"], r["under_redundant"]) == (EXTENTS - 1, 1)
    assert code == 1
    code, r = run_json(capsys, "scrub", str(pool_dir), "--restart")
    assert not r["resumed"] and r["checked"] == EXTENTS
    code, r = run_json(capsys, "scrub", str(pool_dir))  # the last one finished: a new scrub
    assert not r["resumed"] and r["checked"] == EXTENTS


def test_scrub_counts_fragments_on_a_failed_disk_as_lost_and_repair_moves_them(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Pool.open(pool_dir) as pool:
        set_disk_health(pool, "1", "failed")
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 1
    assert r["under_redundant"] > 0 and r["unreadable"] == 0
    assert all("disk 1 has failed" in p["detail"] for p in r["problems"])
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 0 and r["repaired"] > 0 and r["under_redundant"] == 0
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        assert conn.execute("SELECT count(*) FROM fragments WHERE disk_id = 1").fetchone()[0] == 0
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 0 and r["healthy"] == EXTENTS
    assert all_read_back(pool_dir)


def test_scrub_reports_a_missing_disk_and_repairs_only_once_it_is_failed(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = tmp_path / "disk2"
    shutil.rmtree(gone)
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 1
    assert [d["id"] for d in r["disks"]] == [3] and "missing" in r["disks"][0]["problem"]
    assert r["repaired"] == 0 and r["under_redundant"] > 0
    assert "repairs skipped" in r["notes"][0] and "fail-disk" in r["notes"][0]
    assert not gone.exists()  # nothing was written where the disk should be
    assert cli("fail-disk", str(pool_dir), "3") == 0
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 0 and r["repaired"] > 0
    assert all_read_back(pool_dir)


def test_scrub_reports_a_disk_whose_label_was_replaced(
        pool_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "disk4" / LABEL_NAME
    other.write_bytes((tmp_path / "disk5" / LABEL_NAME).read_bytes())
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 1
    assert [d["id"] for d in r["disks"]] == [5]
    assert "label of another pool or disk" in r["disks"][0]["problem"]
    assert r["under_redundant"] > 0


def test_scrub_finds_a_fragment_file_that_belongs_to_another_extent(
        pool_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = fragment_paths(pool_dir, "big/one.bin")
    one[0][0].write_bytes(one[1][0].read_bytes())  # same size, valid on its own, wrong place
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 1
    [problem] = r["problems"]
    assert "header names another fragment" in problem["detail"]


def test_scrub_checks_replicas_and_names_every_hard_link(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, disks=4, policy="replicate:3")
    write_files(pool_dir, {"a/file": data_of("file", 100_000)})
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        a = ns.lookup(ROOT_INO, b"a")
        ino = ns.lookup(a.ino, b"file").ino
        ns.link(ino, ROOT_INO, b"link")
        ns.close()
    flip_byte(fragment_paths(pool_dir, "a/file")[1][2])
    code, r = run_json(capsys, "scrub", str(pool_dir))
    assert code == 1
    [problem] = r["problems"]
    assert problem["paths"] == ["/a/file", "/link"]
    assert problem["detail"].startswith("2 of 3 fragments good")
    code, r = run_json(capsys, "scrub", str(pool_dir), "--repair")
    assert code == 0 and r["repaired"] == 1
    assert read_file(pool_dir, "link") == data_of("file", 100_000)
