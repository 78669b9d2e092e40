"""The extent store keeps DESIGN invariants 1-4 and 6 on real pools.

Every test builds a pool in tmp_path with real disk directories, writes through
ExtentStore and checks the metadata, the fragments on disk and what reads return.
Faults come from damaging real fragments on disk or from FaultyDisk in place of a disk.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.directory import DirectoryDisk, FragmentRef
from dynamicfs.disks.faulty import FaultRule, FaultyDisk
from dynamicfs.engine import store as engine_store
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import FsError, NoSpaceError, UnreadableError
from dynamicfs.redundancy.policy import Policy, replicate
from fragment_spot import FragmentSpot
from test_engine_support import (
    EC42,
    REP3,
    KiB,
    PoolMaker,
    assert_accounting_matches_files,
    assert_distinct_disks,
    count,
    data_for,
    disk_of,
    files_on_disks,
    fragment_file,
    fragment_spot,
    fragments,
    read_fresh,
    store,
)

MakePool = PoolMaker


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


# -- invariant 1: no two fragments of one extent on one disk -------------------------------
@pytest.mark.parametrize("disks", [6, 7])
def test_no_two_fragments_of_an_extent_share_a_disk(make_pool: MakePool, disks: int) -> None:
    pool = make_pool(disks)
    rng = random.Random(disks)
    items = [(d, EC42 if i % 2 else REP3) for i, d in enumerate(data_for(rng, 60))]
    ids = []
    for start in range(0, len(items), 12):
        ids += store(pool, items[start: start + 12])
    assert_distinct_disks(pool)
    for extent_id, (_, policy) in zip(ids, items, strict=True):
        assert len(fragments(pool, extent_id)) == policy.width


@pytest.mark.parametrize("disks", [6, 7])
def test_rebuild_keeps_fragments_of_an_extent_on_distinct_disks(
        make_pool: MakePool, disks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # So many lost fragments would make disks suspect (and no longer take the rebuilt
    # fragments); this test is about where rebuilt fragments go, so keep them healthy.
    monkeypatch.setattr(engine_store, "SUSPECT_AFTER", 10**6)
    pool = make_pool(disks)
    rng = random.Random(disks)
    items = [(d, EC42 if i % 2 else REP3) for i, d in enumerate(data_for(rng, 30))]
    ids = store(pool, items)
    # Lose one fragment file of every extent, and fail disk 1 outright.
    for extent_id in ids:
        fragment_file(pool, extent_id, rng.randrange(3)).unlink()
    set_disk_health(pool, "1", "failed")
    for extent_id in ids:
        pool.store.rebuild(extent_id)
    pool.meta.commit()
    assert_distinct_disks(pool)
    for extent_id, (data, policy) in zip(ids, items, strict=True):
        rows = fragments(pool, extent_id)
        assert 1 not in {d for _, _, _, d in rows}
        # Width is back wherever enough healthy disks remain.
        assert len(rows) == min(policy.width, disks - 1)
        assert read_fresh(pool, extent_id) == data


# -- invariant 2: fragments written once, names unique ---------------------------------------
def test_a_fragment_is_never_overwritten(make_pool: MakePool) -> None:
    pool = make_pool(6)
    (extent_id,) = store(pool, [(b"first", REP3)])
    fid, _, _, disk_id = fragments(pool, extent_id)[0]
    spot = fragment_spot(pool, fid, disk_id)
    before = spot.read_bytes()
    header = fragfmt.make_header(extent_id, fid, 0, b"second")
    # Even the same id written again is appended elsewhere, never over the record.
    segment, offset = pool.backends[disk_id].write_fragment(fid, header, b"second")
    assert (segment, offset) != (spot.ref.segment, spot.ref.offset)
    assert offset >= spot.ref.offset + spot.ref.size or segment != spot.ref.segment
    assert spot.read_bytes() == before
    # Segment files are created with O_EXCL: an existing one is never reused.
    disk = pool.backends[disk_id]
    disk.close()
    with pytest.raises(FileExistsError):
        disk.write_fragment(spot.ref.segment or 0, header, b"third")


def test_writes_and_rebuilds_leave_existing_fragment_files_untouched(make_pool: MakePool) -> None:
    pool = make_pool(7)
    rng = random.Random(2)
    ids = store(pool, [(d, EC42) for d in data_for(rng, 10)])

    def snapshot() -> dict[FragmentRef, bytes]:
        out = {}
        for fid, _, _, disk_id in fragments(pool):
            spot = fragment_spot(pool, fid, disk_id)
            out[spot.ref] = spot.read_bytes()
        return out

    before = snapshot()
    store(pool, [(d, EC42) for d in data_for(rng, 10)])
    fragment_file(pool, ids[0], 0).unlink()
    pool.store.rebuild(ids[0])
    pool.meta.commit()
    after = snapshot()
    survivors = [ref for ref in before if ref in after]
    assert len(survivors) == len(before) - 1
    for ref in survivors:
        assert after[ref] == before[ref]


def test_ids_stay_unique_across_reopen(make_pool: MakePool) -> None:
    pool = make_pool(6)
    rng = random.Random(3)
    old_ids = store(pool, [(d, EC42) for d in data_for(rng, 8)])
    old_frags = {r[0] for r in fragments(pool)}
    # Also leave files behind from a batch that never committed (as after a crash).
    pool.store.write([(d, REP3) for d in data_for(rng, 4)])
    pool.meta.rollback()
    path = pool.path
    pool.close()

    pool = Pool.open(path)
    try:
        new_ids = store(pool, [(d, EC42) for d in data_for(rng, 8)])
        new_frags = {r[0] for r in fragments(pool)} - old_frags
        assert min(new_ids) > max(old_ids)
        assert min(new_frags) > max(old_frags)
        names = files_on_disks(pool)
        assert len(names) == len(set(names))
        assert old_frags | new_frags <= set(names)
    finally:
        pool.close()


# -- invariant 3: metadata names only durable fragments ----------------------------------------
def test_every_recorded_fragment_file_exists_with_its_header(make_pool: MakePool) -> None:
    pool = make_pool(6)
    rng = random.Random(4)
    items = [(d, EC42 if i % 2 else REP3) for i, d in enumerate(data_for(rng, 12))]
    ids = store(pool, items)
    with pool.meta.read() as conn:
        rows = conn.execute("SELECT id, extent_id, idx, disk_id, size, checksum "
                            "FROM fragments").fetchall()
    assert {r[1] for r in rows} == set(ids)
    for fid, extent_id, idx, disk_id, size, checksum in rows:
        raw = fragment_spot(pool, fid, disk_id).read_bytes()
        assert len(raw) == size
        head, _ = fragfmt.parse(raw)
        assert (head.extent_id, head.fragment_id, head.index) == (extent_id, fid, idx)
        assert head.length == size - fragfmt.HEADER_SIZE
        assert head.checksum == checksum


def test_commit_syncs_fragments_before_the_metadata(make_pool: MakePool) -> None:
    pool = make_pool(6)
    faulty = FaultyDisk(pool.backends[3], own_device=True)
    pool.backends[3] = faulty
    store(pool, [(b"x" * 5000, EC42)])
    assert faulty.calls["sync"] >= 1


def test_a_failed_fragment_sync_keeps_the_extent_out_of_the_metadata(make_pool: MakePool) -> None:
    pool = make_pool(6)
    (kept,) = store(pool, [(b"committed before", REP3)])
    pool.backends[3] = FaultyDisk(pool.backends[3], [FaultRule("sync", "eio")],
                                  own_device=True)
    with pool.meta.write() as conn:
        (lost,) = pool.store.store(conn, [(os.urandom(40 * KiB), EC42)])
    with pytest.raises(OSError) as failure:
        pool.meta.commit()
    assert failure.value.errno == errno.EIO
    path = pool.path
    pool.close()

    pool = Pool.open(path)
    try:
        with pool.meta.read() as conn:
            extents = {r[0] for r in conn.execute("SELECT id FROM extents")}
            named = {r[0] for r in conn.execute("SELECT DISTINCT extent_id FROM fragments")}
        assert kept in extents and lost not in extents
        assert lost not in named
        assert read_fresh(pool, kept) == b"committed before"
    finally:
        pool.close()


# -- invariant 4: a read returns checked bytes or EIO -----------------------------------------
def _damage_payload(spot: FragmentSpot) -> None:
    spot.flip(fragfmt.HEADER_SIZE + (spot.size - fragfmt.HEADER_SIZE) // 2)


def _damage_header(spot: FragmentSpot) -> None:
    spot.flip(20)  # inside the extent id


def _truncate(spot: FragmentSpot) -> None:
    raw = spot.read_bytes()
    spot.write_bytes(raw[: fragfmt.HEADER_SIZE + (spot.size - fragfmt.HEADER_SIZE) // 2])


def _delete(spot: FragmentSpot) -> None:
    spot.unlink()


DAMAGE = {"payload-bitflip": _damage_payload, "header-bitflip": _damage_header,
          "truncated": _truncate, "deleted": _delete}
POLICIES = {"ec:4+2": EC42, "replicate:3": REP3}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_reads_survive_damage_up_to_the_policy_and_fail_with_eio_beyond(
        make_pool: MakePool, damage: str, policy_name: str) -> None:
    pool = make_pool(6)
    policy = POLICIES[policy_name]
    data = random.Random(5).randbytes(50 * KiB + 7)
    (extent_id,) = store(pool, [(data, policy)])
    tolerated = policy.m  # replicate:N has m = N-1
    # Data shards are read first, so damage those: every damaged one must be noticed.
    for index in range(tolerated):
        DAMAGE[damage](fragment_file(pool, extent_id, index))
        assert read_fresh(pool, extent_id) == data
    assert extent_id in pool.store.repair_wanted
    DAMAGE[damage](fragment_file(pool, extent_id, tolerated))
    with pytest.raises(UnreadableError) as failure:
        read_fresh(pool, extent_id)
    assert failure.value.errno == errno.EIO


@pytest.mark.parametrize("policy_name", POLICIES)
def test_a_fragment_file_holding_another_fragment_is_refused(make_pool: MakePool,
                                                            policy_name: str) -> None:
    pool = make_pool(6)
    policy = POLICIES[policy_name]
    data = random.Random(6).randbytes(30 * KiB)
    (extent_id,) = store(pool, [(data, policy)])
    # A whole, self-consistent fragment file in the wrong place.
    for index in range(policy.m + 1):
        wrong = fragment_file(pool, extent_id, (index + 1) % policy.width).read_bytes()
        fragment_file(pool, extent_id, index).write_bytes(wrong)
    with pytest.raises(UnreadableError):
        read_fresh(pool, extent_id)


@pytest.mark.parametrize("where", ["data", "pyeclib-header"])
def test_an_ec_read_names_the_damaged_data_fragment(make_pool: MakePool, where: str) -> None:
    """An ec read checks its k data fragments with one hash of the joined extent; when
    that fails, each fragment is hashed to find the bad one, which counts against its
    disk and is repaired, and the extent is decoded from the others."""
    pool = make_pool(6)
    data = random.Random(9).randbytes(300 * KiB + 3)
    (extent_id,) = store(pool, [(data, EC42)])
    spot = fragment_file(pool, extent_id, 2)
    # The payload starts with the codec's own header, then this fragment's data part.
    spot.flip(fragfmt.HEADER_SIZE + (5 if where == "pyeclib-header" else 4000))
    bad_disk = disk_of(pool, extent_id, 2)
    before = {d: info.checksum_errors for d, info in pool.disks.items()}
    assert read_fresh(pool, extent_id) == data
    after = {d: info.checksum_errors for d, info in pool.disks.items()}
    assert {d for d in after if after[d] != before[d]} == {bad_disk}
    assert extent_id in pool.store.repair_wanted
    assert read_fresh(pool, extent_id) == data  # again: still decoded, counted once
    assert pool.disks[bad_disk].checksum_errors == after[bad_disk]


@pytest.mark.parametrize("fault", ["eio", "bitflip"])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_reads_survive_disks_that_fail_or_corrupt_reads(make_pool: MakePool, fault: str,
                                                       policy_name: str) -> None:
    pool = make_pool(6)
    policy = POLICIES[policy_name]
    data = random.Random(7).randbytes(33 * KiB)
    (extent_id,) = store(pool, [(data, policy)])
    bad = [disk_of(pool, extent_id, i) for i in range(policy.m + 1)]
    for disk_id in bad[:-1]:
        pool.backends[disk_id] = FaultyDisk(pool.backends[disk_id],
                                            [FaultRule("read", fault)])
    assert read_fresh(pool, extent_id) == data
    pool.backends[bad[-1]] = FaultyDisk(pool.backends[bad[-1]],
                                        [FaultRule("read", fault)])
    with pytest.raises(UnreadableError):
        read_fresh(pool, extent_id)


# -- invariant 6: never claim more redundancy than stored ----------------------------------------
def test_ec_on_five_healthy_disks_stores_an_under_redundant_extent(make_pool: MakePool) -> None:
    pool = make_pool(6)
    set_disk_health(pool, "6", "failed")
    data = os.urandom(20 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    rows = fragments(pool, extent_id)
    assert len(rows) == 5 < EC42.width
    assert sorted(i for _, _, i, _ in rows) == [0, 1, 2, 3, 4]
    assert read_fresh(pool, extent_id) == data


@pytest.mark.parametrize(("policy", "disks", "stored"),
                         [(EC42, 4, None), (REP3, 2, 2), (REP3, 1, None), (replicate(1), 1, 1)])
def test_writes_below_the_minimum_fail_with_enospc(make_pool: MakePool, policy: Policy,
                                                  disks: int, stored: int | None) -> None:
    pool = make_pool(disks)
    if stored is None:
        with pytest.raises(NoSpaceError) as failure:
            store(pool, [(b"data", policy)])
        assert failure.value.errno == errno.ENOSPC
        assert count(pool, "extents") == count(pool, "fragments") == 0
        assert files_on_disks(pool) == []
    else:
        (extent_id,) = store(pool, [(b"data", policy)])
        assert len(fragments(pool, extent_id)) == stored


def test_a_full_disk_makes_the_fragment_move_to_another_disk(make_pool: MakePool) -> None:
    pool = make_pool(7)
    pool.backends[2] = FaultyDisk(pool.backends[2],
                                  [FaultRule("write", "enospc")])
    rng = random.Random(8)
    items = [(d, EC42) for d in data_for(rng, 6)]
    ids = store(pool, items)
    for extent_id, (data, _) in zip(ids, items, strict=True):
        rows = fragments(pool, extent_id)
        assert len(rows) == 6 and 2 not in {d for _, _, _, d in rows}
        assert read_fresh(pool, extent_id) == data
    assert_distinct_disks(pool)
    assert list(DirectoryDisk(pool.disks[2].path).list_fragments()) == []


@pytest.mark.parametrize("fault", ["eio", "short", "enospc"])
def test_a_failing_disk_leaves_the_extent_with_fewer_fragments(make_pool: MakePool,
                                                              fault: str) -> None:
    pool = make_pool(6)
    faulty = FaultyDisk(pool.backends[4], [FaultRule("write", fault)])
    pool.backends[4] = faulty
    data = os.urandom(45 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    rows = fragments(pool, extent_id)
    assert len(rows) == 5 and 4 not in {d for _, _, _, d in rows}
    assert faulty.injected
    # The half-written fragment file is gone; everything recorded is whole.
    assert list(faulty.inner.list_fragments()) == []
    for fid, _, _, disk_id in rows:
        fragfmt.parse(fragment_spot(pool, fid, disk_id).read_bytes())
    assert read_fresh(pool, extent_id) == data


@pytest.mark.parametrize(("fault", "error"), [("eio", errno.EIO), ("enospc", errno.ENOSPC)])
def test_too_many_failing_disks_fail_the_write_cleanly(make_pool: MakePool, fault: str,
                                                       error: int) -> None:
    pool = make_pool(6)
    (kept,) = store(pool, [(b"before", REP3)])
    for disk_id in (2, 5):
        pool.backends[disk_id] = FaultyDisk(pool.backends[disk_id],
                                            [FaultRule("write", fault)])
    with pytest.raises(FsError) as failure:
        with pool.meta.write() as conn:
            pool.store.store(conn, [(os.urandom(10 * KiB), EC42)])
    assert failure.value.errno == error
    pool.meta.commit()  # the pool goes on: nothing half-done is left to commit
    assert count(pool, "extents") == 1
    assert read_fresh(pool, kept) == b"before"
    assert_accounting_matches_files(pool)


def test_discarded_extents_leave_no_files_and_nothing_to_sync(make_pool: MakePool) -> None:
    pool = make_pool(6)
    (kept,) = store(pool, [(b"kept", REP3)])
    written = pool.store.write([(os.urandom(9 * KiB), EC42)])
    pool.store.discard(written)
    with pool.meta.write() as conn:
        conn.execute("UPDATE inodes SET mode = mode WHERE ino = 1")
    pool.meta.commit()
    assert_accounting_matches_files(pool)
    assert read_fresh(pool, kept) == b"kept"


def test_a_disk_failing_midway_through_a_batch_leaves_a_clean_commit(
        make_pool: MakePool) -> None:
    pool = make_pool(7)
    # Enough fragments per disk for more than one write task; the 6th write fails.
    faulty = FaultyDisk(pool.backends[3], [FaultRule("write", "eio", after=5, times=1)],
                        own_device=True)
    pool.backends[3] = faulty
    rng = random.Random(9)
    items = [(rng.randbytes(256 * KiB), EC42) for _ in range(8)]
    ids = store(pool, items)
    assert faulty.injected == [("write", "eio", faulty.injected[0][2])]
    for extent_id, (data, _) in zip(ids, items, strict=True):
        assert len(fragments(pool, extent_id)) == 6
        assert read_fresh(pool, extent_id) == data
    assert_distinct_disks(pool)
    assert_accounting_matches_files(pool)


def test_the_metadata_refuses_two_fragments_of_an_extent_on_one_disk(make_pool: MakePool) -> None:
    pool = make_pool(6)
    (extent_id,) = store(pool, [(b"abc", REP3)])
    fid, _, _, disk_id = fragments(pool, extent_id)[0]
    with pytest.raises(sqlite3.IntegrityError):
        with pool.meta.write() as conn:
            conn.execute("INSERT INTO fragments (id, extent_id, idx, disk_id, size, checksum) "
                         "VALUES (?, ?, 9, ?, 1, x'00')", (fid + 1000, extent_id, disk_id))


def test_a_batch_that_runs_out_of_space_leaves_nothing_behind(make_pool: MakePool) -> None:
    pool = make_pool(6, capacity=300 * KiB)
    (kept,) = store(pool, [(b"kept", REP3)])
    rng = random.Random(10)
    # About five of these fit; the batch fails as a whole once placement runs out.
    with pytest.raises(NoSpaceError):
        with pool.meta.write() as conn:
            pool.store.store(conn, [(rng.randbytes(100 * KiB), REP3) for _ in range(12)])
    pool.meta.commit()
    assert count(pool, "extents") == 1
    assert_accounting_matches_files(pool)
    assert read_fresh(pool, kept) == b"kept"
    # The space is usable again.
    store(pool, [(rng.randbytes(100 * KiB), REP3) for _ in range(4)])
    assert_accounting_matches_files(pool)
