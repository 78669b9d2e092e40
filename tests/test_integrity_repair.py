"""The repair queue: what the read path found bad, what sits on failed disks and what was
written short of its policy is rebuilt, least redundant first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamicfs.admin.disks import add_disk, set_disk_health
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.parallel import LOAD_BATCH, RECORD_BATCH
from dynamicfs.maintenance.repair import pending_repairs, persist_repair_wanted, rebuild_pending
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO
from fragment_spot import FragmentSpot
from integrity_support import (
    cli,
    data_of,
    flip_byte,
    fragment_paths,
    make_pool,
    read_file,
    write_files,
)

DATA = data_of("data", 6 * 64 * 1024)


def repair_json(capsys: pytest.CaptureFixture[str], pool_dir: Path,
                *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    capsys.readouterr()
    code = cli("repair", str(pool_dir), *args, "--json")
    return code, json.loads(capsys.readouterr().out)


def fragments_per_extent(pool_dir: Path) -> list[int]:
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        return [r[0] for r in conn.execute(
            "SELECT count(f.id) FROM extents e LEFT JOIN fragments f ON f.extent_id = e.id "
            "GROUP BY e.id ORDER BY e.id")]


def test_extents_the_read_path_found_bad_are_queued_and_repaired(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path)
    write_files(pool_dir, {"f": DATA})
    fragment_paths(pool_dir, "f")[2][0].unlink()  # a data fragment: reads need it
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        ino = ns.lookup(ROOT_INO, b"f").ino
        assert ns.read(ino, 0, len(DATA)) == DATA  # served from the other fragments
        ns.close()
        assert len(pool.store.repair_wanted) == 1
        assert persist_repair_wanted(pool) == 1
        assert not pool.store.repair_wanted
        with pool.meta.read() as conn:
            [(reason,)] = conn.execute("SELECT reason FROM repair_queue").fetchall()
        assert "bad or missing fragment" in reason
    code, r = repair_json(capsys, pool_dir)
    assert code == 0 and r["clean"]
    assert (r["pending"], r["repaired"], r["remaining"]) == (1, 1, 0)
    with Pool.open(pool_dir) as pool:
        assert scrub(pool).clean
        with pool.meta.read() as conn:
            assert conn.execute("SELECT count(*) FROM repair_queue").fetchone()[0] == 0


def test_repair_rebuilds_failed_disks_least_redundant_extent_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, disks=8)
    write_files(pool_dir, {"a": DATA, "b": data_of("b", 200_000)})
    with Pool.open(pool_dir) as pool:
        with pool.meta.read() as conn:
            on: dict[int, set[int]] = {}
            for extent_id, disk_id in conn.execute("SELECT extent_id, disk_id FROM fragments"):
                on.setdefault(disk_id, set()).add(extent_id)
        # Two disks that share some extents but not all: margins 0 and 1 after they fail.
        first, second = next((a, b) for a in on for b in on
                             if a < b and on[a] & on[b] and on[a] ^ on[b])
        on_both, on_any = on[first] & on[second], on[first] | on[second]
        set_disk_health(pool, str(first), "failed")
        set_disk_health(pool, str(second), "failed")
        pending = pending_repairs(pool)
    assert {p.extent_id for p in pending} == on_any
    margins = [p.margin for p in pending]
    assert margins == sorted(margins)
    assert {p.extent_id for p in pending if p.margin == 0} == on_both
    code, r = repair_json(capsys, pool_dir)
    assert code == 0 and r["repaired"] == len(on_any) and r["remaining"] == 0
    assert fragments_per_extent(pool_dir) == [6] * len(fragments_per_extent(pool_dir))
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        assert conn.execute("SELECT count(*) FROM fragments WHERE disk_id IN (?, ?)",
                            (first, second)).fetchone()[0] == 0
    assert read_file(pool_dir, "a") == DATA


def test_a_repair_mends_what_the_last_scrub_found(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """health and the failure margin go by what is wrong now: extents the last scrub
    found under-redundant, and a repair has rebuilt since, no longer count."""
    pool_dir = make_pool(tmp_path, disks=7)
    write_files(pool_dir, {"f": DATA})
    with Pool.open(pool_dir) as pool:
        with pool.meta.read() as conn:
            disk = conn.execute("SELECT disk_id FROM fragments LIMIT 1").fetchone()[0]
        set_disk_health(pool, str(disk), "failed")
        found = scrub(pool)
        assert found.under_redundant > 0 and found.repaired == 0
    capsys.readouterr()
    assert cli("health", str(pool_dir), "--json") == 1
    health = json.loads(capsys.readouterr().out)
    assert health["scrub_findings"] == {"under-redundant": found.under_redundant}
    code, r = repair_json(capsys, pool_dir)
    assert code == 0 and r["repaired"] == found.under_redundant
    assert cli("remove-disk", str(pool_dir), str(disk)) == 0
    capsys.readouterr()
    assert cli("health", str(pool_dir), "--json") == 0
    health = json.loads(capsys.readouterr().out)
    assert health["status"] == "healthy" and health["problems"] == []
    assert health["scrub_findings"] == {"repaired": found.under_redundant}


def test_extents_written_short_of_their_policy_are_completed_once_a_disk_is_added(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path)
    with Pool.open(pool_dir) as pool:
        set_disk_health(pool, "6", "failed")
    write_files(pool_dir, {"f": DATA})  # ec:4+2 on 5 healthy disks: 5 fragments each
    assert set(fragments_per_extent(pool_dir)) == {5}
    code, r = repair_json(capsys, pool_dir)
    assert code == 1
    assert r["pending"] == 6 and r["stuck"] == 6 and r["remaining"] == 6
    assert "not enough healthy disks" in r["problems"][0]["detail"]
    assert r["problems"][0]["paths"] == ["/f"]
    spare = tmp_path / "spare"
    spare.mkdir()
    with Pool.open(pool_dir) as pool:
        add_disk(pool, spare)
    code, r = repair_json(capsys, pool_dir)
    assert code == 0 and r["repaired"] == 6
    assert set(fragments_per_extent(pool_dir)) == {6}
    assert read_file(pool_dir, "f") == DATA


def test_repair_stops_at_its_limit_and_when_asked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, disks=7)
    write_files(pool_dir, {"f": DATA})
    with Pool.open(pool_dir) as pool:
        set_disk_health(pool, "3", "failed")
        report = rebuild_pending(pool, should_stop=lambda: True)
        assert report.attempted == 0 and report.remaining == report.pending > 1
    code, r = repair_json(capsys, pool_dir, "--limit", "1")
    assert code == 1 and r["attempted"] == 1 and r["repaired"] == 1
    assert r["remaining"] == r["pending"] - 1
    code, r = repair_json(capsys, pool_dir)
    assert code == 0 and r["remaining"] == 0


def test_an_extent_that_cannot_be_rebuilt_stays_queued_as_unreadable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path)
    write_files(pool_dir, {"f": DATA})
    for fragment in fragment_paths(pool_dir, "f")[0][:3]:
        fragment.unlink()
    with Pool.open(pool_dir) as pool:
        scrub(pool)  # finds it and queues it
    code, r = repair_json(capsys, pool_dir)
    assert code == 1 and r["unreadable"] == 1
    assert r["problems"][0]["paths"] == ["/f"]
    with Pool.open(pool_dir) as pool, pool.meta.read() as conn:
        [(reason,)] = conn.execute("SELECT reason FROM repair_queue").fetchall()
    assert reason.startswith("unreadable:")


def test_a_failed_disk_with_many_extents_and_mixed_damage_is_rebuilt_in_batches(
        tmp_path: Path) -> None:
    # More extents than one load and one record batch hold; among them one whose
    # survivor is corrupt (found when the re-created fragment fails its checksum), one
    # that lost too much, and a queued extent that no longer exists.
    pool_dir = make_pool(tmp_path, disks=7)
    big = data_of("big", 120 * 64 * 1024)
    write_files(pool_dir, {"big": big})
    failed_disk = tmp_path / "disk2"
    spots = fragment_paths(pool_dir, "big")
    on_failed = [n for n, frags in enumerate(spots)
                 if any(s.disk.root == failed_disk for s in frags)]
    corrupt, lost = on_failed[10], on_failed[70]
    bad = next(s for s in spots[corrupt][:4] if s.disk.root != failed_disk)
    flip_byte(bad, 4096)  # in the coded bytes
    for spot in [s for s in spots[lost] if s.disk.root != failed_disk][:2]:
        spot.unlink()
    with Pool.open(pool_dir) as pool:
        with pool.meta.write() as conn:
            conn.execute("INSERT INTO repair_queue (extent_id, reason, queued) "
                         "VALUES (999999, 'test', 0)")
        set_disk_health(pool, str(failed_disk), "failed")
        report = rebuild_pending(pool)
        assert report.pending == len(on_failed) + 1 > LOAD_BATCH + RECORD_BATCH
        assert (report.repaired, report.already_healthy, report.unreadable) == \
            (len(on_failed) - 1, 1, 1)
        assert report.remaining == 1 and report.problems[0].paths == ["/big"]
        with pool.meta.read() as conn:
            queued = conn.execute("SELECT extent_id, reason FROM repair_queue").fetchall()
        assert len(queued) == 1 and queued[0][1].startswith("unreadable:")
        assert pool.disks[pool_disk_id(pool, bad)].checksum_errors == 1
        result = scrub(pool)
        assert (result.unreadable, result.under_redundant) == (1, 0)
        assert result.healthy == len(spots) - 1
        assert not bad.exists()  # re-created elsewhere, then freed


def pool_disk_id(pool: Pool, spot: FragmentSpot) -> int:
    root = str(spot.disk.root)
    return next(d.id for d in pool.disks.values() if d.path == root)


def test_fragments_on_a_draining_disk_are_left_to_the_drain(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=7)
    write_files(pool_dir, {"f": DATA})
    with Pool.open(pool_dir) as pool:
        set_disk_health(pool, "2", "draining")
        assert pending_repairs(pool) == []
        set_disk_health(pool, "2", "failed")
        assert pending_repairs(pool)
