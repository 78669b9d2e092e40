"""Disk health from errors: a disk that keeps failing checks turns suspect by itself,
gets no new fragments, and is drained by the background rebuilder; an operator can put
it back, and a fragment found bad again does not count twice."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamicfs.admin.disks import set_disk_health
from dynamicfs.engine.store import SUSPECT_AFTER
from dynamicfs.maintenance.rebuilder import BackgroundRebuild, read_state
from test_engine_support import REP3, PoolMaker, fragment_file, fragments, read_fresh, store


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolMaker]:
    with PoolMaker(tmp_path) as maker:
        yield maker


def _lose_on_disk(pool, ids: list[int], disk: int,  # type: ignore[no-untyped-def]
                  limit: int | None = None) -> int:
    lost = 0
    for extent_id in ids[:limit]:
        for _fid, eid, index, d in fragments(pool, extent_id):
            if d == disk:
                fragment_file(pool, eid, index).unlink()
                lost += 1
    return lost


def test_a_disk_with_repeated_errors_turns_suspect_and_gets_no_new_fragments(
        make_pool: PoolMaker) -> None:
    pool = make_pool(4)
    rng = random.Random(1)
    items = [(rng.randbytes(2000), REP3) for _ in range(3 * SUSPECT_AFTER)]
    ids = store(pool, items)
    disk = fragments(pool, ids[0])[0][3]
    assert _lose_on_disk(pool, ids, disk) >= SUSPECT_AFTER
    for extent_id, (data, _) in zip(ids, items, strict=True):
        # Every replica read first from the sick disk fails over to a good one.
        assert read_fresh(pool, extent_id) == data
        for _ in range(2):  # rereads of the same bad fragment count once
            assert read_fresh(pool, extent_id) == data
    assert pool.disks[disk].state == "suspect"
    assert "errors" in pool.disks[disk].reason
    new = store(pool, [(b"after" * 100, REP3)] * 5)
    assert all(d != disk for e in new for *_, d in fragments(pool, e))


def test_an_operator_reset_restarts_the_error_window(make_pool: PoolMaker) -> None:
    pool = make_pool(4)
    rng = random.Random(2)
    items = [(rng.randbytes(1000), REP3) for _ in range(2 * SUSPECT_AFTER)]
    ids = store(pool, items)
    disk = fragments(pool, ids[0])[0][3]
    assert _lose_on_disk(pool, ids, disk, limit=SUSPECT_AFTER) == SUSPECT_AFTER
    for extent_id in ids:
        read_fresh(pool, extent_id)
    assert pool.disks[disk].state == "suspect"
    set_disk_health(pool, str(disk), "healthy")
    for extent_id, (data, _) in zip(ids, items, strict=True):
        assert read_fresh(pool, extent_id) == data  # the same bad fragments again
    assert pool.disks[disk].state == "healthy"


def test_the_background_rebuilder_heals_read_errors_and_drains_a_suspect_disk(
        make_pool: PoolMaker) -> None:
    pool = make_pool(5)
    rng = random.Random(3)
    items = [(rng.randbytes(3000), REP3) for _ in range(2 * SUSPECT_AFTER)]
    ids = store(pool, items)
    disk = fragments(pool, ids[0])[0][3]
    _lose_on_disk(pool, ids, disk)
    for extent_id in ids:
        read_fresh(pool, extent_id)
    assert pool.disks[disk].state == "suspect"
    rebuilder = BackgroundRebuild(pool)
    for _ in range(20):
        if not rebuilder.step():
            break
    pool.meta.commit()
    for extent_id, (data, _) in zip(ids, items, strict=True):
        rows = fragments(pool, extent_id)
        assert len(rows) == 3
        assert disk not in {d for *_, d in rows}
        assert read_fresh(pool, extent_id) == data
    state = read_state(pool.path)
    # The extents whose reads failed were rebuilt as a pass; the rest moved off the
    # suspect disk afterwards.
    assert state is not None and state.done >= SUSPECT_AFTER and not state.active
