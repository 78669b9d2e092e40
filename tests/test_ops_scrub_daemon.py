"""The background scrub: commands, schedule, repairs, manners, and resuming where it stood."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from admin_support import assert_one_line_error, data_of, make_pool, run, write_files
from dynamicfs.disks.directory import FragmentRef
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance import background, scrub
from dynamicfs.maintenance.background import BackgroundScrub, Cursor, Schedule
from dynamicfs.observability import metrics
from dynamicfs.observability.audit import read_audit
from fragment_spot import FragmentSpot

KiB = 1024
# Fast enough for tests, and a `low` slow enough to pause a pass in the middle.
RATES = {"low": 400_000, "medium": 10**12, "high": 10**12}


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@contextmanager
def scrubbing(pool: Pool, **options: object) -> Iterator[BackgroundScrub]:
    settings: dict[str, object] = {"quiet": 0.0, "rates": RATES, **options}
    scrubber = BackgroundScrub(pool, **settings)  # type: ignore[arg-type]
    scrubber.start()
    try:
        yield scrubber
    finally:
        scrubber.stop()


def local(*fields: int) -> float:
    year, month, day, hour, minute = fields
    return time.mktime((year, month, day, hour, minute, 0, 0, 0, -1))


def test_schedule_is_due_once_per_period_after_its_hour() -> None:
    nightly = Schedule("nightly", "low", 2, local(2026, 1, 1, 12, 0))
    ran = Cursor(last_pass_started=local(2026, 3, 9, 2, 5))
    assert not background.due(nightly, ran, local(2026, 3, 10, 1, 0))
    assert background.due(nightly, ran, local(2026, 3, 10, 2, 30))
    assert background.next_due(nightly, ran, local(2026, 3, 10, 1, 0)) == local(2026, 3, 10, 2, 0)

    weekly = Schedule("weekly", "low", 2, local(2026, 1, 1, 12, 0))
    ran = Cursor(last_pass_started=local(2026, 3, 7, 2, 0))
    assert not background.due(weekly, ran, local(2026, 3, 10, 2, 30))
    assert background.due(weekly, ran, local(2026, 3, 14, 2, 30))

    fresh = Schedule("nightly", "low", 2, local(2026, 3, 10, 15, 0))
    assert not background.due(fresh, Cursor(), local(2026, 3, 10, 16, 0))
    assert background.next_due(fresh, Cursor(), local(2026, 3, 10, 16, 0)) == \
        local(2026, 3, 11, 2, 0)
    assert background.due(Schedule("continuous", "low", 2, 0.0), ran, time.time())
    assert not background.due(None, Cursor(), time.time())


def test_scrub_daemon_commands_need_a_mounted_pool_but_the_schedule_does_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None, None], policy="replicate:2")
    for action in ("start", "status", "pause", "resume", "stop"):
        code, _, err = run(capsys, "scrub-daemon", action, pool_dir)
        assert_one_line_error(code, err)
        assert "not mounted" in err

    code, out, _ = run(capsys, "scrub-schedule", pool_dir, "--frequency", "weekly",
                       "--intensity", "low", "--hour", "3")
    assert code == 0 and "weekly at 03:00" in out and "not mounted" in out
    with Pool.open(pool_dir) as pool:
        stored = background.load_schedule(pool)
    assert stored is not None
    assert (stored.frequency, stored.intensity, stored.hour) == ("weekly", "low", 3)
    code, _, _ = run(capsys, "scrub-schedule", pool_dir, "--frequency", "off")
    assert code == 0
    with Pool.open(pool_dir) as pool:
        assert background.load_schedule(pool) is None
    code, _, _ = run(capsys, "scrub-schedule", pool_dir, "--frequency", "hourly")
    assert code != 0


def test_background_scrub_repairs_a_rotten_fragment_and_audits_it(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {f"/f{i}": data_of(f"f{i}", 128 * KiB) for i in range(4)})
    with Pool.open(pool_dir) as pool:
        extent_id, disk_id, *where = pool.meta.conn.execute(
            "SELECT extent_id, disk_id, id, segment, offset, size FROM fragments "
            "ORDER BY extent_id, idx LIMIT 1 OFFSET 5").fetchone()
        FragmentSpot(pool.disks[disk_id].path, FragmentRef(*where)).flip(-10)

        with scrubbing(pool) as scrubber:
            scrubber.command("start", "high")
            wait_for(lambda: scrubber.status().passes == 1)
            status = scrubber.status()
        assert (status.mode, status.last_pass_checked, status.repaired) == ("idle", 8, 1)
        assert status.last_pass_problems == 0
        info = scrub.load_extent(pool, extent_id)
        assert info is not None
        assert scrub.check_extent(pool, info, {}).state == scrub.HEALTHY
        assert pool.disks[disk_id].checksum_errors >= 1
        found = pool.meta.conn.execute("SELECT state FROM scrub_problems WHERE extent_id = ?",
                                       (extent_id,)).fetchone()
        assert found == (scrub.REPAIRED,)
    repairs = [r for r in read_audit(pool_dir) if r["event"] == "repair"]
    assert len(repairs) == 1
    assert (repairs[0]["extent"], repairs[0]["outcome"], repairs[0]["by"], repairs[0]["via"]) \
        == (extent_id, "repaired", "background scrub", "daemon")


def test_paused_pass_resumes_where_it_stood_after_the_pool_is_reopened(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/big": data_of("big", 40 * 64 * KiB)})
    with Pool.open(pool_dir) as pool, scrubbing(pool) as scrubber:
        scrubber.command("start", "low")
        wait_for(lambda: scrubber.status().checked >= 2)
        paused = scrubber.command("pause")
        assert paused.mode == "paused"
        assert 2 <= paused.checked < 40
        assert paused.checked + paused.remaining == 40
    with Pool.open(pool_dir) as pool, scrubbing(pool) as scrubber:
        again = scrubber.status()
        assert (again.mode, again.position, again.checked) == ("paused", paused.position,
                                                               paused.checked)
        scrubber.command("resume", "high")
        wait_for(lambda: scrubber.status().passes == 1)
        done = scrubber.status()
        assert (done.mode, done.last_pass_checked, done.progress) == ("idle", 40, 0.0)
        with pytest.raises(background.ScrubDaemonError, match="nothing to pause"):
            scrubber.command("pause")


def test_background_scrub_waits_while_users_do_io(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/f": data_of("f", 256 * KiB)})
    with Pool.open(pool_dir) as pool, scrubbing(pool, quiet=600.0, max_yield=600.0) as scrubber:
        metrics.observe_fuse("read", 0.001)
        scrubber.command("start", "high")
        wait_for(lambda: scrubber.status().yielding)
        status = scrubber.status()
        assert (status.mode, status.checked) == ("running", 0)


def test_continuous_schedule_starts_pass_after_pass(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 2, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/f": data_of("f", 256 * KiB)})
    with Pool.open(pool_dir) as pool:
        background.save_schedule(pool, "continuous", "high")
        with scrubbing(pool, idle_poll=0.05) as scrubber:
            wait_for(lambda: scrubber.status().passes >= 2)
            status = scrubber.status()
        assert status.last_pass_checked == 4
        assert status.schedule is not None and status.schedule.frequency == "continuous"


@pytest.mark.fuse
def test_scrub_daemon_runs_in_the_mount_daemon_and_its_passes_persist(
        tmp_path: Path, fuse_available: None, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:2", extent_size=64 * KiB)
    write_files(pool_dir, {"/f": data_of("f", 512 * KiB)})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = [sys.executable, "-m", "dynamicfs.cli.main"]
    subprocess.run([*cli, "mount", str(pool_dir), str(mnt)], check=True, capture_output=True,
                   timeout=120)
    try:
        code, out, _ = run(capsys, "scrub-daemon", "start", pool_dir, "--intensity", "high")
        assert code == 0 and "running" in out

        def finished() -> bool:
            code, out, _ = run(capsys, "scrub-daemon", "status", pool_dir, "--json")
            return code == 0 and json.loads(out)["passes"] >= 1

        wait_for(finished)
        code, _, err = run(capsys, "scrub-daemon", "pause", pool_dir)
        assert_one_line_error(code, err)
        code, out, _ = run(capsys, "health", pool_dir, "--json")
        assert json.loads(out)["background_scrub"]["checked"] == 8
    finally:
        done = subprocess.run([*cli, "unmount", str(mnt)], capture_output=True, timeout=300)
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    with Pool.open(pool_dir) as pool:
        cursor = background.load_cursor(pool)
    assert (cursor.passes, cursor.last_pass_checked, cursor.mode) == (1, 8, "idle")
    started = [r for r in read_audit(pool_dir) if r.get("op") == "scrub-daemon"]
    assert started[0]["via"] == "control" and started[0]["outcome"] == "ok"
