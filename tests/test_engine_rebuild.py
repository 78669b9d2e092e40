"""Rebuild brings an extent back to full width on distinct disks, or fails and changes nothing."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.faulty import FaultRule, FaultyDisk
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import UnreadableError
from dynamicfs.redundancy.policy import Policy
from test_engine_support import (
    EC42,
    REP3,
    KiB,
    PoolMaker,
    assert_accounting_matches_files,
    assert_distinct_disks,
    disk_of,
    fragment_file,
    fragment_spot,
    fragments,
    read_fresh,
    store,
)

POLICIES = {"ec:4+2": EC42, "replicate:3": REP3}
MiB = 1024 * KiB


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


def assert_whole(pool: Pool, extent_id: int, policy: Policy, data: bytes) -> None:
    """Full width, one fragment per index, each file intact, bytes right."""
    rows = fragments(pool, extent_id)
    assert sorted(i for _, _, i, _ in rows) == list(range(policy.width))
    assert len({d for _, _, _, d in rows}) == policy.width
    for fid, _, _, disk_id in rows:
        fragfmt.parse(fragment_spot(pool, fid, disk_id).read_bytes())
    assert read_fresh(pool, extent_id) == data


def disk_files(pool: Pool) -> dict[Path, bytes]:
    """Every segment file of every disk, with its bytes."""
    return {p: p.read_bytes() for d in pool.disks.values()
            for p in Path(d.path, "segments").glob("*.seg")}


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("disks", [6, 7])
def test_rebuild_restores_lost_fragments_to_full_width(make_pool: PoolMaker, policy_name: str,
                                                      disks: int) -> None:
    pool = make_pool(disks)
    policy = POLICIES[policy_name]
    rng = random.Random(disks)
    items = [(rng.randbytes(rng.randrange(1, 40 * KiB)), policy) for _ in range(8)]
    ids = store(pool, items)
    for n, extent_id in enumerate(ids):
        for index in rng.sample(range(policy.width), 1 + n % policy.m):
            fragment_file(pool, extent_id, index).unlink()
    assert {pool.store.rebuild(extent_id) for extent_id in ids} == {"repaired"}
    pool.meta.commit()
    for extent_id, (data, _) in zip(ids, items, strict=True):
        assert_whole(pool, extent_id, policy, data)
        assert pool.store.rebuild(extent_id) == "healthy"
    assert_distinct_disks(pool)
    assert_accounting_matches_files(pool)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_rebuild_with_too_few_good_fragments_fails_and_changes_nothing(
        make_pool: PoolMaker, policy_name: str) -> None:
    pool = make_pool(7)
    policy = POLICIES[policy_name]
    data = random.Random(1).randbytes(30 * KiB)
    (extent_id,) = store(pool, [(data, policy)])
    for index in range(policy.m + 1):
        raw = bytearray(fragment_file(pool, extent_id, index).read_bytes())
        raw[-1] ^= 1
        fragment_file(pool, extent_id, index).write_bytes(bytes(raw))
    rows, files = fragments(pool), disk_files(pool)
    with pytest.raises(UnreadableError):
        pool.store.rebuild(extent_id)
    pool.meta.commit()
    assert fragments(pool) == rows
    assert disk_files(pool) == files


def test_rebuild_moves_fragments_off_a_failed_disk(make_pool: PoolMaker) -> None:
    pool = make_pool(8)
    rng = random.Random(2)
    items = [(rng.randbytes(20 * KiB), EC42 if i % 2 else REP3) for i in range(10)]
    ids = store(pool, items)
    set_disk_health(pool, "2", "failed")
    for extent_id in ids:
        pool.store.rebuild(extent_id)
    pool.meta.commit()
    for extent_id, (data, policy) in zip(ids, items, strict=True):
        assert_whole(pool, extent_id, policy, data)
        assert 2 not in {d for _, _, _, d in fragments(pool, extent_id)}


def test_rebuild_puts_a_lost_fragment_back_on_its_own_disk_when_no_other_is_free(
        make_pool: PoolMaker) -> None:
    pool = make_pool(6)
    data = random.Random(3).randbytes(50 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    home = disk_of(pool, extent_id, 2)
    fragment_file(pool, extent_id, 2).unlink()
    assert pool.store.rebuild(extent_id) == "repaired"
    pool.meta.commit()
    assert disk_of(pool, extent_id, 2) == home
    assert_whole(pool, extent_id, EC42, data)


def test_rebuild_completes_an_under_redundant_extent_once_a_disk_returns(
        make_pool: PoolMaker) -> None:
    pool = make_pool(6)
    set_disk_health(pool, "4", "failed")
    data = random.Random(4).randbytes(10 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    assert len(fragments(pool, extent_id)) == 5
    assert pool.store.rebuild(extent_id) == "stuck"
    set_disk_health(pool, "4", "healthy")
    assert pool.store.rebuild(extent_id) == "repaired"
    pool.meta.commit()
    assert_whole(pool, extent_id, EC42, data)
    assert_accounting_matches_files(pool)


def test_a_rebuild_whose_writes_fail_leaves_consistent_metadata(make_pool: PoolMaker) -> None:
    # Equal declared capacities make the spare disk (most free) the first choice.
    pool = make_pool(7, capacity=8 * MiB)
    data = random.Random(5).randbytes(40 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    spare = (set(pool.disks) - {d for _, _, _, d in fragments(pool, extent_id)}).pop()
    # Index 0 loses its file (its disk may take it back), index 1 loses its disk.
    fragment_file(pool, extent_id, 0).unlink()
    set_disk_health(pool, str(disk_of(pool, extent_id, 1)), "failed")
    # Index 0 goes to the spare, whose write fails; index 1 must not take index 0's disk.
    pool.backends[spare] = FaultyDisk(pool.backends[spare], [FaultRule("write", "short")])
    pool.store.rebuild(extent_id)
    pool.meta.commit()
    assert_distinct_disks(pool)
    assert read_fresh(pool, extent_id) == data
    assert list(pool.backends[spare].list_fragments()) == []
    pool.backends[spare] = pool.backends[spare].inner
    assert pool.store.rebuild(extent_id) == "repaired"
    pool.meta.commit()
    assert_whole(pool, extent_id, EC42, data)
    assert_accounting_matches_files(pool)


def ec_extent_losing(make_pool: PoolMaker, seed: int, index: int
                     ) -> tuple[Pool, int, bytes]:
    """A 7-disk pool with one ec:4+2 extent whose fragment `index` is on a failed disk."""
    pool = make_pool(7)
    data = random.Random(seed).randbytes(300 * KiB)
    (extent_id,) = store(pool, [(data, EC42)])
    set_disk_health(pool, str(disk_of(pool, extent_id, index)), "failed")
    return pool, extent_id, data


def checksums(pool: Pool, extent_id: int) -> dict[int, bytes]:
    with pool.meta.read() as conn:
        return dict(conn.execute("SELECT idx, checksum FROM fragments WHERE extent_id = ?",
                                 (extent_id,)).fetchall())


@pytest.mark.parametrize("parallel", [True, False])
def test_rebuild_after_a_disk_failure_reads_only_k_fragments(make_pool: PoolMaker,
                                                             parallel: bool) -> None:
    pool, extent_id, data = ec_extent_losing(make_pool, 11, 2)
    before = checksums(pool, extent_id)
    failed = next(d for d in pool.disks.values() if not d.readable)
    on_failed = list(pool.backends[failed.id].list_fragments())
    reads = sum(d.reads for d in pool.disks.values())
    assert pool.store.rebuild(extent_id, verify=False, parallel=parallel) == "repaired"
    pool.meta.commit()
    assert sum(d.reads for d in pool.disks.values()) - reads == EC42.k
    pool.store.wait_for_unlinks()
    assert list(pool.backends[failed.id].list_fragments()) == on_failed  # never written
    # The re-created fragment is byte for byte the lost one (checked against its checksum).
    assert checksums(pool, extent_id) == before
    assert_whole(pool, extent_id, EC42, data)
    assert_accounting_matches_files(pool)


def test_rebuild_without_verify_recreates_a_bad_fragment_it_meets(make_pool: PoolMaker) -> None:
    pool, extent_id, data = ec_extent_losing(make_pool, 12, 5)
    bad = fragment_file(pool, extent_id, 0)
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    assert pool.store.rebuild(extent_id, verify=False) == "repaired"
    pool.meta.commit()
    assert_whole(pool, extent_id, EC42, data)
    assert_accounting_matches_files(pool)


def test_rebuild_without_verify_trusts_fragments_it_did_not_need(make_pool: PoolMaker) -> None:
    # A bad parity fragment is not read when the data shards suffice: finding it is
    # scrub's work, and a verifying rebuild (what a scrub or a read queues) re-creates it.
    pool, extent_id, data = ec_extent_losing(make_pool, 13, 1)
    parity = fragment_file(pool, extent_id, 5)
    parity.write_bytes(parity.read_bytes()[:100])
    assert pool.store.rebuild(extent_id, verify=False) == "repaired"
    pool.meta.commit()
    assert fragment_file(pool, extent_id, 5) == parity
    assert pool.store.rebuild(extent_id, verify=True) == "repaired"
    pool.meta.commit()
    assert_whole(pool, extent_id, EC42, data)


def test_rebuild_without_verify_fails_and_changes_nothing_when_survivors_are_bad(
        make_pool: PoolMaker) -> None:
    # Index 5 is lost and two of the survivors it would be made from are bad: the
    # re-created fragment fails its recorded checksum, every survivor is then hashed,
    # and three good ones are too few.
    pool, extent_id, _ = ec_extent_losing(make_pool, 14, 5)
    for index in (0, 1):
        raw = bytearray(fragment_file(pool, extent_id, index).read_bytes())
        raw[-1] ^= 1
        fragment_file(pool, extent_id, index).write_bytes(bytes(raw))
    rows, files = fragments(pool), disk_files(pool)
    with pytest.raises(UnreadableError):
        pool.store.rebuild(extent_id, verify=False)
    pool.meta.commit()
    assert fragments(pool) == rows
    assert disk_files(pool) == files


def test_a_prepared_rebuild_of_an_extent_rebuilt_meanwhile_is_stale_and_freed(
        make_pool: PoolMaker) -> None:
    pool, extent_id, data = ec_extent_losing(make_pool, 15, 3)
    info = pool.store.load(extent_id)
    prepared = pool.store.prepare_rebuild(info, verify=False)
    assert not isinstance(prepared, str) and len(prepared.new_rows) == 1
    assert pool.store.rebuild(extent_id, verify=False) == "repaired"  # someone else's
    pool.meta.commit()
    rows = fragments(pool, extent_id)
    with pool.meta.write() as conn:
        assert pool.store.record_rebuilt(conn, prepared) == "stale"
    pool.meta.commit()
    pool.store.wait_for_unlinks()
    assert fragments(pool, extent_id) == rows
    assert_whole(pool, extent_id, EC42, data)
    assert_accounting_matches_files(pool)


def test_load_many_loads_each_extent_with_its_fragments(make_pool: PoolMaker) -> None:
    pool = make_pool(6)
    ids = store(pool, [(bytes([n]) * 5000, EC42 if n % 2 else REP3) for n in range(5)])
    infos = pool.store.load_many([*ids, 10**9])
    assert sorted(infos) == sorted(ids)
    for extent_id in ids:
        assert infos[extent_id] == pool.store.load(extent_id)
