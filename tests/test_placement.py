"""Placement: fragments go to the disks with the most free space, so unequal disks even
out and the pool stores as much as their sizes allow; `auto` never asks for more disks
than are healthy."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.errors import NoSpaceError
from dynamicfs.placement.placement import Candidate, choose_disks, usable_capacity
from dynamicfs.redundancy.policy import AUTO_EC_THRESHOLD, replicate
from test_engine_support import KiB, PoolMaker, assert_distinct_disks, fragments, store

MiB = 1024 * KiB
REP2 = replicate(2)


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


def test_choose_disks_prefers_free_space_and_skips_full_or_excluded_disks() -> None:
    candidates = [Candidate(1, 50), Candidate(2, 500), Candidate(3, 5), Candidate(4, 300),
                  Candidate(5, 400)]
    assert choose_disks(candidates, 3, 10) == [2, 5, 4]
    assert choose_disks(candidates, 3, 10, exclude={2}) == [5, 4, 1]
    assert choose_disks(candidates, 9, 10) == [2, 5, 4, 1]  # disk 3 has no room
    assert choose_disks(candidates, 2, 450) == [2]


def test_choose_disks_prefers_the_requested_tier() -> None:
    candidates = [Candidate(1, 900, "slow"), Candidate(2, 100, "fast"),
                  Candidate(3, 200, "fast"), Candidate(4, 800, "slow")]
    assert choose_disks(candidates, 3, 10, prefer_tier="fast") == [3, 2, 1]


@pytest.mark.parametrize("free", [[2, 4, 8], [5, 5, 5, 1], [10, 1, 1, 1, 1], [3, 3]])
def test_usable_capacity_matches_filling_the_emptiest_disks_first(free: list[int]) -> None:
    # Simulate placement unit by unit: each stripe goes to the two emptiest disks.
    left = [f * 1000 for f in free]
    stored = 0
    while True:
        order = sorted(range(len(left)), key=lambda i: -left[i])[:2]
        if len(order) < 2 or left[order[1]] <= 0:
            break
        for i in order:
            left[i] -= 1
        stored += 1
    assert usable_capacity([f * 1000 for f in free], 2, 1) == stored


def test_unequal_disks_fill_until_the_pool_is_full(make_pool: PoolMaker) -> None:
    caps = [2 * MiB, 4 * MiB, 8 * MiB]
    pool = make_pool(3, capacity=caps)
    extent = 32 * KiB
    fragment = extent + 80
    usable = usable_capacity(caps, 2, 1)
    rng = random.Random(1)
    stored = 0
    spread = []
    with pytest.raises(NoSpaceError):
        while True:
            free = [pool.store.disk_free(d) for d in sorted(pool.disks)]
            spread.append(max(free) - min(free))
            before = [pool.disks[d].used for d in sorted(pool.disks)]
            store(pool, [(rng.randbytes(extent), REP2) for _ in range(8)])
            stored += 8 * extent
            gained = [pool.disks[d].used - b for d, b in zip(sorted(pool.disks), before,
                                                              strict=True)]
            # More free space never receives less of the new data.
            by_free = [g for _, g in sorted(zip(free, gained, strict=True))]
            assert by_free == sorted(by_free)
    # The free space evens out as the disks fill ...
    assert all(b <= a + fragment for a, b in zip(spread, spread[1:], strict=False))
    # ... so the pool holds (nearly) all that the sizes allow, and no disk overflows.
    assert stored >= 0.95 * usable * extent / fragment
    for d, cap in zip(sorted(pool.disks), caps, strict=True):
        assert pool.disks[d].used <= cap
    assert_distinct_disks(pool)


def test_a_declared_capacity_is_never_exceeded(make_pool: PoolMaker) -> None:
    pool = make_pool(4, capacity=[1 * MiB, 1 * MiB, 3 * MiB, 600 * KiB])
    rng = random.Random(2)
    with pytest.raises(NoSpaceError):
        for _ in range(200):
            store(pool, [(rng.randbytes(rng.randrange(1, 64 * KiB)), replicate(3))])
    with pool.meta.read() as conn:
        for used, capacity in conn.execute("SELECT used, capacity FROM disks"):
            assert used <= capacity


@pytest.mark.parametrize("size", [0, AUTO_EC_THRESHOLD - 1, AUTO_EC_THRESHOLD, 1 << 30])
def test_auto_never_asks_for_more_disks_than_are_healthy(make_pool: PoolMaker,
                                                        size: int) -> None:
    pool = make_pool(8)
    for failed in range(8):
        healthy = 8 - failed
        policy = pool.resolve_policy("auto", size)
        assert policy.width <= healthy
        if healthy >= 6:
            assert str(policy) == ("ec:4+2" if size >= AUTO_EC_THRESHOLD else "replicate:3")
        (extent_id,) = store(pool, [(b"x" * 5000, policy)])
        assert len(fragments(pool, extent_id)) == policy.width
        set_disk_health(pool, str(failed + 1), "failed", force=True)
