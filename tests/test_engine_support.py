"""Helpers for the engine, placement and namespace tests: real pools in tmp_path.

No tests here. `PoolMaker` builds pools over fresh disk directories and closes them
at the end of a test; the functions read the metadata and the fragments on disk back.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import TracebackType

from dynamicfs.admin.disks import add_disk
from dynamicfs.admin.init import DEFAULT_EXTENT_SIZE, init_pool
from dynamicfs.disks.directory import DirectoryDisk, FragmentRef
from dynamicfs.engine.pool import Pool
from dynamicfs.redundancy.policy import Policy, ec, replicate
from fragment_spot import FragmentSpot

EC42 = ec(4, 2)
REP3 = replicate(3)
KiB = 1024


class PoolMaker:
    """make(disks, capacity=None): an open pool over `disks` fresh directories."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.opened: list[Pool] = []

    def __call__(self, disks: int, capacity: int | list[int] | None = None,
                 extent_size: int = DEFAULT_EXTENT_SIZE, policy: str = "auto") -> Pool:
        n = len(self.opened)
        path = self.tmp_path / f"pool{n}"
        init_pool(path, extent_size=extent_size, default_policy=policy)
        pool = self.open(path)
        caps = capacity if isinstance(capacity, list) else [capacity] * disks
        for i, cap in enumerate(caps):
            root = self.tmp_path / f"pool{n}-disk{i}"
            root.mkdir()
            add_disk(pool, root, capacity=cap)
        return pool

    def open(self, path: Path) -> Pool:
        pool = Pool.open(path)
        self.opened.append(pool)
        return pool

    def reopen(self, pool: Pool) -> Pool:
        pool.close()
        return self.open(pool.path)

    def __enter__(self) -> PoolMaker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for pool in self.opened:
            try:
                pool.close()
            except Exception:
                pass


def store(pool: Pool, items: list[tuple[bytes, Policy]]) -> list[int]:
    with pool.meta.write() as conn:
        ids = pool.store.store(conn, items)
    pool.meta.commit()
    return ids


def fragments(pool: Pool, extent_id: int | None = None) -> list[tuple[int, int, int, int]]:
    """(fragment id, extent id, index, disk id) rows, by extent and index."""
    sql = "SELECT id, extent_id, idx, disk_id FROM fragments"
    args: tuple[int, ...] = ()
    if extent_id is not None:
        sql += " WHERE extent_id = ?"
        args = (extent_id,)
    with pool.meta.read() as conn:
        return [tuple(r) for r in conn.execute(sql + " ORDER BY extent_id, idx", args)]


def count(pool: Pool, table: str) -> int:
    with pool.meta.read() as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def fragment_ref(pool: Pool, fragment_id: int) -> FragmentRef:
    with pool.meta.read() as conn:
        row = conn.execute("SELECT id, segment, offset, size FROM fragments WHERE id = ?",
                           (fragment_id,)).fetchone()
    assert row is not None, f"no fragment {fragment_id}"
    return FragmentRef(*row)


def fragment_spot(pool: Pool, fragment_id: int, disk_id: int) -> FragmentSpot:
    return FragmentSpot(pool.disks[disk_id].path, fragment_ref(pool, fragment_id))


def fragment_file(pool: Pool, extent_id: int, index: int) -> FragmentSpot:
    for fid, _, idx, disk_id in fragments(pool, extent_id):
        if idx == index:
            return fragment_spot(pool, fid, disk_id)
    raise AssertionError(f"extent {extent_id} has no fragment {index}")


def disk_of(pool: Pool, extent_id: int, index: int) -> int:
    return next(d for _, _, i, d in fragments(pool, extent_id) if i == index)


def read_fresh(pool: Pool, extent_id: int) -> bytes:
    """Read an extent from its fragments, not from the extent cache."""
    pool.store.cache.drop(extent_id)
    return pool.store.read(extent_id)


def files_on_disks(pool: Pool) -> list[int]:
    """Fragment ids of every live fragment on every readable disk (duplicates kept), once
    the fragments freed by past commits are freed (that happens on a background thread).
    A failed disk is never written to: what it held stays there, for the garbage
    collector should it come back."""
    pool.store.wait_for_unlinks()
    return [ref.id for d in pool.disks.values() if d.readable
            for ref, _ in DirectoryDisk(d.path).list_fragments()]


def assert_distinct_disks(pool: Pool) -> None:
    with pool.meta.read() as conn:
        shared = conn.execute("SELECT extent_id, disk_id, count(*) FROM fragments "
                              "GROUP BY extent_id, disk_id HAVING count(*) > 1").fetchall()
    assert shared == []


def data_for(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(rng.choice([1, 4 * KiB - 3, 20 * KiB, 64 * KiB])) for _ in range(n)]


def assert_accounting_matches_files(pool: Pool) -> None:
    """Fragment files on disk are exactly the recorded ones; `used` counts their bytes."""
    recorded = {fid: disk_id for fid, _, _, disk_id in fragments(pool)}
    assert sorted(files_on_disks(pool)) == sorted(recorded)
    sizes = {d: 0 for d in pool.disks}
    for fid, disk_id in recorded.items():
        sizes[disk_id] += fragment_spot(pool, fid, disk_id).read_bytes().__len__()
    with pool.meta.read() as conn:
        assert dict(conn.execute("SELECT id, used FROM disks").fetchall()) == sizes
    assert {d: info.used for d, info in pool.disks.items()} == sizes
