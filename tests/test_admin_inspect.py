"""status, list-extents and show-redundancy report what the metadata says: extents by
state, capacity under the usual policies, files at risk, fragments and their disks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from admin_support import (
    MiB,
    assert_one_line_error,
    data_of,
    make_pool,
    run,
    sql,
    write_files,
)
from dynamicfs.placement.placement import usable_capacity

EXTENT = 256 * 1024
CAPS = [10 * MiB, 20 * MiB, 30 * MiB, 40 * MiB, 50 * MiB, 60 * MiB]


def _status(capsys: pytest.CaptureFixture[str], pool_dir: Path) -> dict:  # type: ignore[type-arg]
    code, out, err = run(capsys, "status", pool_dir, "--json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def test_status_of_an_empty_pool_reports_capacity_and_what_auto_means(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, CAPS)
    s = _status(capsys, pool_dir)
    assert s["disks_by_state"]["healthy"] == 6
    assert s["raw_capacity"] == s["raw_free"] == sum(CAPS)
    assert s["raw_used"] == 0
    usable = {u["policy"]: u for u in s["usable"]}
    assert usable["replicate:3"]["capacity"] == usable_capacity(CAPS, 3, 1)
    assert usable["ec:4+2"]["capacity"] == usable_capacity(CAPS, 6, 4)
    assert usable["ec:4+2"]["capacity"] == 4 * 10 * MiB  # the smallest disk bounds ec:4+2
    assert s["default_policy"] == "auto"
    assert s["auto_means"] == "replicate:3 under 4 MiB, ec:4+2 from 4 MiB"
    assert (s["extents"], s["repair_queue"], s["files_at_risk"]) == (0, 0, [])

    code, out, _ = run(capsys, "status", "--pool", pool_dir)
    assert code == 0
    assert "default policy: auto (now: replicate:3 under 4 MiB, ec:4+2 from 4 MiB)" in out
    assert "usable under ec:4+2: 40.0 MiB" in out


def test_what_auto_means_follows_the_number_of_healthy_disks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4)
    assert _status(capsys, pool_dir)["auto_means"] == "replicate:3 under 4 MiB, ec:2+2 from 4 MiB"
    assert run(capsys, "fail-disk", pool_dir, "4")[0] == 0
    s = _status(capsys, pool_dir)
    assert s["auto_means"] == "replicate:3 under 4 MiB, replicate:3 from 4 MiB"
    assert s["disks_by_state"] == {"healthy": 3, "suspect": 0, "degraded": 0, "draining": 0,
                                   "failed": 1}


def test_status_counts_under_redundant_and_unreadable_extents_and_names_files_at_risk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="ec:2+1")
    write_files(pool_dir, {"/data/a": data_of("a", 3 * EXTENT), "/b": data_of("b", 1000)})
    s = _status(capsys, pool_dir)
    assert (s["extents"], s["healthy"], s["under_redundant"], s["unreadable"]) == (4, 4, 0, 0)
    assert s["data_bytes"] == 3 * EXTENT + 1000

    assert run(capsys, "fail-disk", pool_dir, "1")[0] == 0
    s = _status(capsys, pool_dir)
    assert (s["healthy"], s["under_redundant"], s["unreadable"]) == (0, 4, 0)
    assert s["files_at_risk"] == []

    assert run(capsys, "fail-disk", pool_dir, "2", "--force")[0] == 0
    s = _status(capsys, pool_dir)
    assert (s["under_redundant"], s["unreadable"]) == (0, 4)
    assert s["files_at_risk"] == ["/b", "/data/a"]
    code, out, _ = run(capsys, "status", pool_dir)
    assert "files at risk (unreadable extents, lost writes): 2" in out
    assert "  /data/a" in out.splitlines()


def test_list_extents_of_a_file_shows_each_chunk_in_order(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, CAPS)
    write_files(pool_dir, {"/dir/file": data_of("f", 2 * EXTENT + 10), "/other": b"x"},
                {"/dir": "ec:4+2"})
    code, out, err = run(capsys, "list-extents", pool_dir, "--file", "/dir/file", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["file"], r["chunk"], r["length"]) for r in rows] == [
        ("/dir/file", 0, EXTENT), ("/dir/file", 1, EXTENT), ("/dir/file", 2, 10)]
    assert {(r["policy"], r["present"], r["width"], r["state"]) for r in rows} == {
        ("ec:4+2", 6, 6, "healthy")}

    code, out, _ = run(capsys, "list-extents", "--pool", pool_dir)
    assert code == 0
    lines = [line for line in out.splitlines() if "/dir/file" in line or "/other" in line]
    assert len(lines) == 4
    assert "replicate:3" in lines[-1] and "3/3" in lines[-1] and "healthy" in lines[-1]


def test_list_extents_marks_extents_on_a_failed_disk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:3")
    write_files(pool_dir, {"/f": data_of("f", 100)})
    run(capsys, "fail-disk", pool_dir, "2")
    rows = json.loads(run(capsys, "list-extents", pool_dir, "--json")[1])
    assert [(r["present"], r["width"], r["state"]) for r in rows] == [(2, 3, "under-redundant")]


def test_show_redundancy_sums_bytes_and_overhead_per_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, CAPS)
    write_files(pool_dir, {"/ec/f": data_of("f", 4 * EXTENT), "/rep/g": data_of("g", EXTENT)},
                {"/ec": "ec:4+2", "/rep": "replicate:3"})
    code, out, err = run(capsys, "show-redundancy", pool_dir, "--json")
    assert code == 0, err
    usage = {u["policy"]: u for u in json.loads(out)["policies"]}
    assert usage["ec:4+2"]["extents"] == 4
    assert usage["ec:4+2"]["bytes"] == 4 * EXTENT
    raw = sql(pool_dir, "SELECT sum(f.size) FROM fragments f JOIN extents e "
                        "ON e.id = f.extent_id WHERE e.policy = 'ec:4+2'")[0][0]
    assert usage["ec:4+2"]["raw_bytes"] == raw
    assert 1.5 <= usage["ec:4+2"]["overhead"] < 1.51
    assert 3.0 <= usage["replicate:3"]["overhead"] < 3.01


def test_show_redundancy_of_a_file_lists_every_fragment_and_its_disk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, CAPS)
    write_files(pool_dir, {"/ec/f": data_of("f", EXTENT + 1)}, {"/ec": "ec:4+2"})
    code, out, err = run(capsys, "show-redundancy", pool_dir, "--file", "/ec/f", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [e["chunk"] for e in result["extents"]] == [0, 1]
    expected = {(idx, disk, path, size) for idx, disk, path, size in sql(
        pool_dir, "SELECT f.idx, f.disk_id, d.path, f.size FROM fragments f "
                  "JOIN disks d ON d.id = f.disk_id")}
    shown = {(f["index"], f["disk_id"], f["disk_path"], f["size"])
             for e in result["extents"] for f in e["fragments"]}
    assert shown == expected
    assert all(len({f["disk_id"] for f in e["fragments"]}) == 6 for e in result["extents"])

    code, out, _ = run(capsys, "show-redundancy", pool_dir, "--file", "/ec/f")
    assert code == 0
    assert "fragments of /ec/f" in out
    assert sum(1 for line in out.splitlines() if str(tmp_path / "disk") in line) == 12


@pytest.mark.parametrize("command", ["list-extents", "show-redundancy"])
@pytest.mark.parametrize("path,message", [("/nope", "no file '/nope'"),
                                          ("/dir", "not a regular file"),
                                          ("/dir/file/x", "no file")])
def test_file_option_refuses_what_is_not_a_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, path: str,
        message: str) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3)
    write_files(pool_dir, {"/dir/file": b"data"})
    code, _, err = run(capsys, command, pool_dir, "--file", path)
    assert_one_line_error(code, err)
    assert message in err


def test_status_shows_the_background_rebuild_of_a_mounted_pool(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3)
    assert _status(capsys, pool_dir)["rebuild"] is None
    # What the mount daemon's rebuilder writes while it works.
    (pool_dir / "rebuild.json").write_text(json.dumps(
        {"active": True, "started": 1.0, "total": 500, "done": 120, "failed": 2,
         "rate": 30.0, "eta_seconds": 12.7, "updated": 5.0}))
    assert _status(capsys, pool_dir)["rebuild"]["done"] == 120
    code, out, _ = run(capsys, "status", pool_dir)
    assert "rebuilding: 120 of 500 extents (30.0/s, about 13 s left), 2 failed" in out


def test_status_says_how_many_disk_failures_the_pool_survives(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, policy="ec:2+2")
    write_files(pool_dir, {"/a": data_of("a", 2 * EXTENT)})
    assert _status(capsys, pool_dir)["survives_failures"] == 2
    assert run(capsys, "fail-disk", pool_dir, "1")[0] == 0
    assert _status(capsys, pool_dir)["survives_failures"] == 1
    code, out, _ = run(capsys, "status", pool_dir)
    assert "survives now: 1 arbitrary disk failure without losing data" in out
    assert run(capsys, "fail-disk", pool_dir, "2")[0] == 0
    assert _status(capsys, pool_dir)["survives_failures"] == 0
