"""remove-disk: draining a disk moves every fragment elsewhere under its extent's policy,
refuses (changing nothing, naming files) when data would be at stake, and survives
being interrupted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from admin_support import (
    MiB,
    assert_one_line_error,
    data_of,
    db_snapshot,
    interrupt_remove_disk,
    make_pool,
    read_files,
    run,
    run_program,
    sql,
    tree,
    write_files,
)
from dynamicfs.admin import registry
from dynamicfs.disks.directory import FragmentRef
from dynamicfs.disks.faulty import ENV_VAR
from dynamicfs.disks.label import LABEL_NAME
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.parallel import LOAD_BATCH, RECORD_BATCH
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import ROOT_INO

UNEQUAL = [16 * MiB, 24 * MiB, 32 * MiB, 40 * MiB, 48 * MiB, 64 * MiB]


def _files() -> dict[str, bytes]:
    return {
        "/ec/big": data_of("big", 2 * MiB + 12345),
        "/ec/sub/other": data_of("other", 700_000),
        "/rep/a": data_of("a", MiB + 1),
        "/rep2/b": data_of("b", 300_000),
        "/small": data_of("small", 5000),
    }


POLICIES = {"/ec": "ec:3+2", "/rep": "replicate:3", "/rep2": "replicate:2"}


def _busiest_disk(pool_dir: Path) -> tuple[int, str, int]:
    return sql(pool_dir, "SELECT d.id, d.path, count(*) FROM fragments f JOIN disks d "
                         "ON d.id = f.disk_id GROUP BY d.id ORDER BY count(*) DESC LIMIT 1")[0]


def _no_extent_twice_on_a_disk(pool_dir: Path) -> None:
    assert sql(pool_dir, "SELECT extent_id, disk_id FROM fragments "
                         "GROUP BY extent_id, disk_id HAVING count(*) > 1") == []


def _every_fragment_row_has_its_file(pool_dir: Path) -> None:
    with Pool.open(pool_dir) as pool:
        rows = sql(pool_dir, "SELECT disk_id, id, segment, offset, size FROM fragments")
        missing = [r for r in rows if not pool.backends[r[0]].fragment_exists(FragmentRef(*r[1:]))]
    assert missing == []


def test_remove_disk_moves_every_fragment_and_every_byte_reads_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, UNEQUAL)
    files = _files()
    write_files(pool_dir, files, POLICIES)
    disk_id, disk_path, count = _busiest_disk(pool_dir)
    assert count > 0

    code, out, err = run(capsys, "remove-disk", pool_dir, disk_path, "--json")

    assert code == 0, err
    report = json.loads(out)
    assert report["removed"] and report["label_removed"]
    assert report["fragments_moved"] == count
    assert report["under_redundant"] == 0 and report["below_minimum"] == 0
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = ?", (disk_id,)) == [(0,)]
    assert sql(pool_dir, "SELECT count(*) FROM disks WHERE id = ?", (disk_id,)) == [(0,)]
    assert not (Path(disk_path) / LABEL_NAME).exists()
    assert list(Path(disk_path).iterdir()) == []
    _no_extent_twice_on_a_disk(pool_dir)
    _every_fragment_row_has_its_file(pool_dir)
    assert read_files(pool_dir, list(files)) == files
    code, out, _ = run(capsys, "status", pool_dir, "--json")
    status = json.loads(out)
    assert status["extents"] == status["healthy"] > 0
    assert status["repair_queue"] == 0


def test_removed_disk_directory_can_be_added_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4)
    write_files(pool_dir, {"/f": data_of("f", 300_000)})
    assert run(capsys, "remove-disk", "--pool", pool_dir, "--disk", tmp_path / "disk0")[0] == 0
    code, out, err = run(capsys, "add-disk", pool_dir, tmp_path / "disk0")
    assert code == 0, err
    assert "added disk 5" in out


def test_remove_disk_reports_progress_up_to_the_total(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, extent_size=64 * 1024)
    write_files(pool_dir, {"/f": data_of("f", MiB)})
    calls: list[tuple[int, int, str]] = []
    with Pool.open(pool_dir) as pool:
        registry.run(pool, "remove-disk", {"ref": "1"},
                     lambda done, total, msg: calls.append((done, total, msg)))
    dones = [c[0] for c in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0


def test_remove_disk_refuses_when_too_few_disks_remain_and_names_the_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Five disks: ec:4+2 extents are stored with 5 fragments, the minimum for ec:4+2.
    pool_dir = make_pool(tmp_path, UNEQUAL[:5])
    files = {"/ec/one": data_of("one", 600_000), "/ec/two": data_of("two", 300_000),
             "/rep/safe": data_of("safe", 200_000)}
    write_files(pool_dir, files, {"/ec": "ec:4+2", "/rep": "replicate:3"})
    disk_id, disk_path, _ = sql(pool_dir, "SELECT d.id, d.path, 0 FROM disks d WHERE d.id IN "
                                "(SELECT disk_id FROM fragments) ORDER BY d.id LIMIT 1")[0]
    before_db, before_disks = db_snapshot(pool_dir), tree(tmp_path)

    code, _, err = run(capsys, "remove-disk", pool_dir, disk_id)

    assert_one_line_error(code, err)
    assert "/ec/one" in err and "/ec/two" in err and "/rep/safe" not in err
    assert "too few disks would remain" in err and "--force" in err
    assert db_snapshot(pool_dir) == before_db
    assert tree(tmp_path) == before_disks


def test_remove_disk_refuses_when_the_other_disks_lack_space(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # replicate:2 over one big and two small disks: every extent has a copy on the big
    # one, and the small ones cannot take a second copy of everything.
    pool_dir = make_pool(tmp_path, [64 * MiB, 3 * MiB, 3 * MiB], policy="replicate:2")
    files = {"/bulk": data_of("bulk", 4 * MiB)}
    write_files(pool_dir, files)
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1") == \
        sql(pool_dir, "SELECT count(*) FROM extents")
    before_db, before_disks = db_snapshot(pool_dir), tree(tmp_path)

    code, _, err = run(capsys, "remove-disk", pool_dir, tmp_path / "disk0")

    assert_one_line_error(code, err)
    assert "the other disks lack free space" in err and "/bulk" in err
    assert db_snapshot(pool_dir) == before_db
    assert tree(tmp_path) == before_disks
    assert read_files(pool_dir, list(files)) == files


def test_forced_remove_leaves_extents_under_redundant_and_queued_for_repair(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, UNEQUAL[:5])
    files = {"/ec/one": data_of("one", 600_000), "/rep/safe": data_of("safe", 200_000)}
    write_files(pool_dir, files, {"/ec": "ec:4+2", "/rep": "replicate:3"})
    ec_extents = sql(pool_dir, "SELECT count(*) FROM extents WHERE policy = 'ec:4+2'")[0][0]

    code, out, err = run(capsys, "remove-disk", pool_dir, "1", "--force", "--json")

    assert code == 0, err
    report = json.loads(out)
    assert report["removed"]
    assert report["below_minimum"] == ec_extents
    assert report["files_below_minimum"] == ["/ec/one"]
    status = json.loads(run(capsys, "status", pool_dir, "--json")[1])
    assert status["under_redundant"] == ec_extents
    assert status["unreadable"] == 0
    assert status["repair_queue"] == ec_extents
    assert read_files(pool_dir, list(files)) == files


def test_remove_disk_keeps_extents_at_their_minimum_and_records_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:3")
    files = {"/f": data_of("f", 600_000)}
    write_files(pool_dir, files)
    extents = sql(pool_dir, "SELECT count(*) FROM extents")[0][0]

    code, out, err = run(capsys, "remove-disk", pool_dir, tmp_path / "disk2")

    assert code == 0, err
    assert f"warning: {extents} extents are under-redundant" in err
    assert "/f" in err
    assert sql(pool_dir, "SELECT count(*) FROM repair_queue") == [(extents,)]
    status = json.loads(run(capsys, "status", pool_dir, "--json")[1])
    assert status["under_redundant"] == extents
    assert read_files(pool_dir, list(files)) == files
    # Going below replicate:3's minimum of two copies is refused.
    code, _, err = run(capsys, "remove-disk", pool_dir, tmp_path / "disk1")
    assert_one_line_error(code, err)
    assert "/f" in err


_CRASH = textwrap.dedent("""
    import os, sys
    from dynamicfs.admin import registry
    from dynamicfs.engine.pool import Pool

    def progress(done, total, message):
        if done == int(sys.argv[2]):
            os._exit(9)

    pool = Pool.open(sys.argv[1])
    registry.run(pool, "remove-disk", {"ref": "1"}, progress)
""")


def test_interrupted_remove_disk_keeps_its_progress_and_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, policy="replicate:3", extent_size=64 * 1024)
    files = {"/f": data_of("f", 8 * MiB)}
    write_files(pool_dir, files)
    on_disk = sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1")[0][0]
    assert on_disk > 80

    crashed = subprocess.run([sys.executable, "-c", _CRASH, str(pool_dir), "80"],
                             capture_output=True, text=True, timeout=120)

    assert crashed.returncode == 9, crashed.stderr
    assert sql(pool_dir, "SELECT state FROM disks WHERE id = 1") == [("draining",)]
    left = sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1")[0][0]
    assert left <= on_disk - 64  # the first periodic commit survived
    _every_fragment_row_has_its_file(pool_dir)
    _no_extent_twice_on_a_disk(pool_dir)
    assert read_files(pool_dir, list(files)) == files
    code, _, err = run(capsys, "remove-disk", pool_dir, "1")
    assert code == 0, err
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1") == [(0,)]
    assert read_files(pool_dir, list(files)) == files


def test_ctrl_c_in_remove_disk_says_where_the_drain_was_left(tmp_path: Path) -> None:
    """Ctrl-C in an offline remove-disk: one line saying that the disk stays draining
    and both ways on; what was moved stays moved, and remove-disk finishes later."""
    pool_dir = make_pool(tmp_path, [None] * 4, policy="replicate:2", extent_size=64 * 1024)
    files = {"/f": data_of("f", 2 * MiB)}
    write_files(pool_dir, files)
    on_disk = sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1")[0][0]
    slow = {**os.environ, ENV_VAR: "read:slow:at=400"}  # every fragment read takes 0.4 s
    code, err = interrupt_remove_disk(pool_dir, 1, slow)
    assert code == 130
    assert_one_line_error(code, err)
    assert "remove-disk stopped part way; disk 1 stays draining" in err, err
    assert f"dynamicfs set-disk-health {pool_dir} 1 healthy" in err, err
    assert sql(pool_dir, "SELECT state FROM disks WHERE id = 1") == [("draining",)]
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1")[0][0] <= on_disk
    _every_fragment_row_has_its_file(pool_dir)
    assert read_files(pool_dir, list(files)) == files
    done = run_program("remove-disk", pool_dir, "1")
    assert done.returncode == 0, done.stderr
    assert read_files(pool_dir, list(files)) == files


def test_pool_stays_usable_while_a_disk_drains(tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, [None] * 5, policy="replicate:3", extent_size=64 * 1024)
    old = data_of("old", 3 * MiB)
    write_files(pool_dir, {"/old": old, "/gone": data_of("gone", 2 * MiB),
                           "/edited": data_of("edited", 2 * MiB)})
    new, patch = data_of("new", 2 * MiB), data_of("patch", MiB)
    with Pool.open(pool_dir) as pool:
        ns = Namespace(pool)
        errors: list[BaseException] = []

        def drain() -> None:
            try:
                registry.run(pool, "remove-disk", {"ref": "2"})
            except BaseException as exc:  # reported below
                errors.append(exc)

        worker = threading.Thread(target=drain)
        worker.start()
        # While it drains: read, create, overwrite (the old extents are freed) and unlink.
        ino = ns.lookup(ROOT_INO, b"old").ino
        assert ns.read(ino, 0, len(old)) == old
        created = ns.create(ROOT_INO, b"new", 0o644, 0, 0).ino
        ns.write(created, 0, new)
        ns.fsync(created)
        ns.release(created)
        edited = ns.lookup(ROOT_INO, b"edited").ino
        ns.open(edited)
        ns.write(edited, 0, patch)
        ns.fsync(edited)
        ns.release(edited)
        ns.unlink(ROOT_INO, b"gone")
        reads = 0
        while worker.is_alive() or reads == 0:
            assert ns.read(ino, 0, len(old)) == old
            reads += 1
        worker.join()
        ns.close()
        assert errors == []
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 2") == [(0,)]
    assert sql(pool_dir, "SELECT count(*) FROM disks WHERE id = 2") == [(0,)]
    assert sql(pool_dir, "SELECT count(*) FROM fragments "
                         "WHERE extent_id NOT IN (SELECT id FROM extents)") == [(0,)]
    assert sql(pool_dir, "SELECT d.id, d.used, coalesce(sum(f.size), 0) FROM disks d "
                         "LEFT JOIN fragments f ON f.disk_id = d.id GROUP BY d.id "
                         "HAVING d.used != coalesce(sum(f.size), 0)") == []
    _no_extent_twice_on_a_disk(pool_dir)
    _every_fragment_row_has_its_file(pool_dir)
    expected = {"/old": old, "/new": new, "/edited": patch + data_of("edited", 2 * MiB)[MiB:]}
    assert read_files(pool_dir, list(expected)) == expected


def test_a_draining_disk_is_still_read_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 3, policy="replicate:3")
    files = {"/f": data_of("f", 400_000)}
    write_files(pool_dir, files)
    assert run(capsys, "set-disk-health", pool_dir, "1", "draining")[0] == 0
    assert run(capsys, "fail-disk", pool_dir, "2")[0] == 0
    assert run(capsys, "fail-disk", pool_dir, "3")[0] == 0  # disk 1 still serves reads
    assert read_files(pool_dir, list(files)) == files


def test_removing_a_dead_disk_rebuilds_its_fragments_from_the_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool_dir = make_pool(tmp_path, [None] * 4, policy="replicate:3")
    files = {"/f": data_of("f", MiB), "/g": data_of("g", 10_000)}
    write_files(pool_dir, files)
    on_disk = sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1")[0][0]
    assert on_disk > 0
    shutil.rmtree(tmp_path / "disk0")
    assert run(capsys, "probe-disks", pool_dir)[0] == 0
    assert sql(pool_dir, "SELECT state FROM disks WHERE id = 1") == [("failed",)]

    code, out, err = run(capsys, "remove-disk", pool_dir, "1", "--json")

    assert code == 0, err
    report = json.loads(out)
    assert report["removed"] and not report["label_removed"]
    assert report["under_redundant"] == report["below_minimum"] == 0
    status = json.loads(run(capsys, "status", pool_dir, "--json")[1])
    assert status["extents"] == status["healthy"]
    assert read_files(pool_dir, list(files)) == files


def test_remove_disk_moves_many_extents_in_batches_and_re_creates_a_bad_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # More extents on the disk than one load and one record batch hold, one of whose
    # fragments there is corrupt: it is re-created from the other replicas instead.
    pool_dir = make_pool(tmp_path, [None] * 4, policy="replicate:3", extent_size=64 * 1024)
    files = {"/f": data_of("f", 8 * MiB)}
    write_files(pool_dir, files)
    on_disk = sql(pool_dir, "SELECT id, segment, offset, size FROM fragments "
                            "WHERE disk_id = 1 ORDER BY id")
    assert len(on_disk) > LOAD_BATCH + RECORD_BATCH
    fid, segment, offset, size = on_disk[40]
    with Pool.open(pool_dir) as pool:
        spot = pool.backends[1].segment_path(segment)
    raw = bytearray(spot.read_bytes())
    raw[offset + size - 100] ^= 0xFF
    spot.write_bytes(bytes(raw))

    code, out, err = run(capsys, "remove-disk", pool_dir, "1", "--json")

    assert code == 0, err
    report = json.loads(out)
    assert report["removed"] and report["fragments_moved"] == len(on_disk)
    assert sql(pool_dir, "SELECT count(*) FROM fragments WHERE disk_id = 1") == [(0,)]
    _no_extent_twice_on_a_disk(pool_dir)
    _every_fragment_row_has_its_file(pool_dir)
    assert read_files(pool_dir, list(files)) == files
    code, out, err = run(capsys, "scrub", pool_dir, "--json")  # no corrupt copy anywhere
    assert code == 0, out + err
    assert json.loads(out)["healthy"] == 128
