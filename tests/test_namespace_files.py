"""File data in the namespace: holes store nothing, overwrites replace extents and free
the old ones once no file refers to them, unlinked open files live until release."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin_support import data_of
from dynamicfs.disks.faulty import FaultRule, FaultyDisk
from dynamicfs.errors import FsError
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import POLICY_XATTR, RENAME_EXCHANGE, ROOT_INO
from test_engine_support import KiB, PoolMaker, count, files_on_disks

E = 64 * KiB


class Mount:
    """A namespace over a 6-disk pool with 64 KiB extents; remount() reopens everything."""

    def __init__(self, maker: PoolMaker) -> None:
        self.maker = maker
        self.pool = maker(6, extent_size=E)
        self.ns = Namespace(self.pool, commit_interval=3600)
        self.ns.setxattr(ROOT_INO, POLICY_XATTR, b"replicate:2")

    def remount(self) -> None:
        self.ns.close()
        self.pool = self.maker.reopen(self.pool)
        self.ns = Namespace(self.pool, commit_interval=3600)

    def create(self, name: bytes, data: bytes = b"", parent: int = ROOT_INO) -> int:
        """A new file holding `data`, synced, still open."""
        ino = self.ns.create(parent, name, 0o644, 0, 0).ino
        if data:
            self.ns.write(ino, 0, data)
        self.ns.fsync(ino)
        return ino

    def chunks(self, ino: int) -> dict[int, int]:
        with self.pool.meta.read() as conn:
            return dict(conn.execute("SELECT chunk, extent_id FROM file_extents WHERE ino = ?",
                                     (ino,)).fetchall())


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    with PoolMaker(tmp_path) as maker:
        m = Mount(maker)
        yield m
        m.ns.close()


def test_holes_read_as_zeros_and_store_nothing(mount: Mount) -> None:
    ino = mount.create(b"sparse")
    mount.ns.write(ino, 10 * E + 5, b"x")
    mount.ns.fsync(ino)
    assert list(mount.chunks(ino)) == [10]
    assert mount.ns.read(ino, 0, 10 * E) == bytes(10 * E)
    assert mount.ns.read(ino, 10 * E, E) == bytes(5) + b"x"
    mount.ns.setattr(ino, size=100 * E)  # growing adds a hole, not data
    mount.ns.fsync(ino)
    attr = mount.ns.getattr(ino)
    assert attr.size == 100 * E
    assert attr.blocks * 512 < 4 * KiB
    assert list(mount.chunks(ino)) == [10]
    assert mount.ns.read(ino, 99 * E, 2 * E) == bytes(E)


def test_a_chunk_overwritten_with_zeros_becomes_a_hole(mount: Mount) -> None:
    ino = mount.create(b"f", os.urandom(2 * E))
    mount.ns.write(ino, E, bytes(E))
    mount.ns.fsync(ino)
    assert list(mount.chunks(ino)) == [0]
    assert count(mount.pool, "extents") == 1
    assert len(files_on_disks(mount.pool)) == 2  # replicate:2 of one extent


def test_overwriting_part_of_an_extent_writes_a_new_one_and_frees_the_old(mount: Mount) -> None:
    data = bytearray(os.urandom(2 * E))
    ino = mount.create(b"f", bytes(data))
    before = mount.chunks(ino)
    mount.ns.write(ino, E + 100, b"new bytes")
    data[E + 100: E + 109] = b"new bytes"
    mount.ns.fsync(ino)
    after = mount.chunks(ino)
    assert after[0] == before[0] and after[1] != before[1]
    assert count(mount.pool, "extents") == 2
    assert len(files_on_disks(mount.pool)) == 4
    assert mount.ns.read(ino, 0, 3 * E) == bytes(data)


def test_hard_links_share_data_until_the_last_name_goes(mount: Mount) -> None:
    data = bytearray(os.urandom(E + 10))
    ino = mount.create(b"a", bytes(data))
    mount.ns.link(ino, ROOT_INO, b"b")
    assert mount.ns.getattr(ino).nlink == 2
    mount.ns.write(ino, 0, b"through a")  # one inode: both names see it
    data[:9] = b"through a"
    mount.ns.release(ino)
    mount.ns.sync_all()
    assert count(mount.pool, "extents") == 2
    mount.ns.unlink(ROOT_INO, b"a")
    mount.ns.sync_all()
    b = mount.ns.lookup(ROOT_INO, b"b")
    assert (b.ino, b.nlink) == (ino, 1)
    assert mount.ns.read(ino, 0, 2 * E) == bytes(data)
    mount.ns.unlink(ROOT_INO, b"b")
    mount.ns.sync_all()
    assert count(mount.pool, "extents") == 0
    assert files_on_disks(mount.pool) == []


def test_truncating_frees_the_extents_past_the_new_end(mount: Mount) -> None:
    data = os.urandom(4 * E)
    ino = mount.create(b"f", data)
    first = mount.chunks(ino)[0]
    mount.ns.setattr(ino, size=E + 10)
    mount.ns.fsync(ino)
    assert mount.chunks(ino)[0] == first and sorted(mount.chunks(ino)) == [0, 1]
    assert count(mount.pool, "extents") == 2
    assert mount.ns.read(ino, 0, 4 * E) == data[: E + 10]
    mount.ns.setattr(ino, size=3 * E)
    assert mount.ns.read(ino, 0, 4 * E) == data[: E + 10] + bytes(2 * E - 10)


def test_an_unlinked_open_file_stays_readable_until_release(mount: Mount) -> None:
    data = os.urandom(E + 3)
    ino = mount.create(b"f", data)
    mount.ns.unlink(ROOT_INO, b"f")
    with pytest.raises(FsError) as failure:
        mount.ns.lookup(ROOT_INO, b"f")
    assert failure.value.errno == errno.ENOENT
    mount.ns.write(ino, len(data), b"more")
    assert mount.ns.read(ino, 0, 2 * E) == data + b"more"
    mount.ns.fsync(ino)
    mount.ns.release(ino)
    with pytest.raises(FsError):
        mount.ns.getattr(ino)
    mount.ns.sync_all()
    assert count(mount.pool, "extents") == 0
    assert files_on_disks(mount.pool) == []


def test_an_unlinked_file_left_open_at_unmount_is_removed_at_the_next_mount(
        mount: Mount) -> None:
    ino = mount.create(b"f", os.urandom(E))
    mount.ns.unlink(ROOT_INO, b"f")
    mount.remount()  # the handle was never released
    with pytest.raises(FsError):
        mount.ns.getattr(ino)
    assert count(mount.pool, "extents") == 0


def _queue_behind_a_busy_flusher(mount: Mount, writes: list[tuple[int, bytes]]) -> int:
    """Hand off several full chunks while the flusher waits for the metadata lock, so
    that they reach it as one batch."""
    other = mount.create(b"other")
    ino = mount.create(b"f")
    with mount.ns.lock:
        mount.ns.write(other, 0, os.urandom(E))  # the flusher takes this and blocks
        for offset, data in writes:
            mount.ns.write(ino, offset, data)
    mount.ns.fsync(ino)
    return ino


def test_the_last_write_of_a_chunk_wins_within_one_flush(mount: Mount) -> None:
    final = os.urandom(E)
    ino = _queue_behind_a_busy_flusher(mount, [(0, os.urandom(E)), (0, bytes(E)), (0, final)])
    assert mount.ns.read(ino, 0, E) == final
    mount.remount()
    assert mount.ns.read(ino, 0, E) == final


def test_a_chunk_written_twice_within_one_flush_leaves_no_extent_behind(mount: Mount) -> None:
    ino = _queue_behind_a_busy_flusher(mount, [(0, os.urandom(E)), (0, os.urandom(E))])
    mount.ns.sync_all()
    assert count(mount.pool, "extents") == 2  # this file's chunk and the other file's
    assert list(mount.chunks(ino)) == [0]
    assert len(files_on_disks(mount.pool)) == 4


def test_writes_across_extent_boundaries_read_back(mount: Mount) -> None:
    rng = random.Random(1)
    data = bytearray(rng.randbytes(5 * E))
    ino = mount.create(b"f", bytes(data))
    for offset in (E - 1, 2 * E - 3, 3 * E, 4 * E + 1):
        piece = rng.randbytes(E + 7)
        mount.ns.write(ino, offset, piece)
        data[offset: offset + len(piece)] = piece
    assert mount.ns.read(ino, 0, 6 * E) == bytes(data)
    mount.ns.release(ino)
    mount.remount()
    assert mount.ns.read(ino, 0, 6 * E) == bytes(data)
    assert mount.ns.getattr(ino).size == len(data)


def test_fsync_reports_a_failed_fragment_sync_and_the_pool_carries_on(mount: Mount) -> None:
    kept = mount.create(b"kept", b"durable")
    mount.ns.release(kept)
    faulty = FaultyDisk(mount.pool.backends[2], [FaultRule("sync", "eio", times=1)],
                        own_device=True)
    mount.pool.backends[2] = faulty
    ino = mount.ns.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    mount.ns.write(ino, 0, os.urandom(E))
    with pytest.raises(OSError) as failure:
        mount.ns.fsync(ino)
    assert failure.value.errno == errno.EIO
    # Nothing of the failed transaction is durable, and the pool goes on working.
    g = mount.create(b"g", b"after the failure")
    mount.ns.release(g)
    mount.remount()
    assert mount.ns.read(mount.ns.lookup(ROOT_INO, b"kept").ino, 0, 99) == b"durable"
    assert mount.ns.read(mount.ns.lookup(ROOT_INO, b"g").ino, 0, 99) == b"after the failure"
    with mount.pool.meta.read() as conn:
        dangling = conn.execute("SELECT count(*) FROM file_extents f LEFT JOIN extents e "
                                "ON e.id = f.extent_id WHERE e.id IS NULL").fetchone()[0]
    assert dangling == 0


def _committed_size(mount: Mount, ino: int) -> int:
    """The size a crash would leave: what a second connection sees of the database."""
    conn = sqlite3.connect(mount.pool.meta.path)
    try:
        return int(conn.execute("SELECT size FROM inodes WHERE ino = ?", (ino,)).fetchone()[0])
    finally:
        conn.close()


def test_a_commit_stores_a_size_only_as_far_as_the_data_is_recorded(mount: Mount) -> None:
    """A file being written while another is fsynced: the commit must not give it a
    size whose bytes are not stored (after a crash it would read zeros there)."""
    ns = mount.ns
    grown = mount.create(b"grown", data_of("old", 2 * E))  # 2 chunks committed
    ns.write(grown, 2 * E, data_of("more", E // 2))  # chunk 2: buffered only
    extended = ns.create(ROOT_INO, b"extended", 0o644, 0, 0).ino
    ns.write(extended, 0, data_of("head", 4096))  # buffered only
    ns.setattr(extended, size=3 * E)  # a larger size, its first bytes still buffered
    mount.create(b"other", b"x" * 100)  # fsync of another file: a group commit
    assert _committed_size(mount, grown) == 2 * E
    assert _committed_size(mount, extended) == 0
    # The live view is the whole file meanwhile, after the inode cache is dropped too.
    ns.rename(ROOT_INO, b"other", ROOT_INO, b"other2", 0)
    assert ns.getattr(grown).size == 2 * E + E // 2
    assert [e.attr.size for e in ns.readdir(ROOT_INO, 0, 10) if e.name == b"extended"] \
        == [3 * E]
    # Written further after that commit, then fsynced: the whole of it, not the size
    # the commit held back.
    ns.write(grown, 2 * E + E // 2, data_of("tail", E))
    ns.fsync(grown)
    ns.fsync(extended)
    assert _committed_size(mount, grown) == 3 * E + E // 2
    assert _committed_size(mount, extended) == 3 * E
    ns.release(grown)
    ns.release(extended)
    mount.remount()
    assert mount.ns.read(grown, 0, 4 * E) == \
        data_of("old", 2 * E) + data_of("more", E // 2) + data_of("tail", E)
    assert mount.ns.read(extended, 0, 3 * E) == data_of("head", 4096) + bytes(3 * E - 4096)


def test_a_chunk_pending_within_the_stored_size_does_not_hold_back_recorded_growth(
        mount: Mount) -> None:
    """An overwrite (or an `auto` rewrite) in flight within the committed size adds no
    byte past it: a commit then stores the growth recorded meanwhile."""
    ns = mount.ns
    ino = mount.create(b"f", data_of("base", 2 * E))  # committed: 2 chunks
    ns.write(ino, 2 * E, data_of("grow", 2 * E))  # chunks 2 and 3: handed over whole
    deadline = time.monotonic() + 30
    while set(mount.chunks(ino)) != {0, 1, 2, 3}:  # recorded, not committed
        assert time.monotonic() < deadline, "the flusher did not record chunks 2 and 3"
        time.sleep(0.001)
    ns.write(ino, 10, b"overwritten")  # chunk 0 whole again: in flight
    ns.fsync(ROOT_INO)  # the directory: commits at once, waiting for no file's data
    assert _committed_size(mount, ino) == 4 * E
    ns.fsync(ino)
    ns.release(ino)
    want = bytearray(data_of("base", 2 * E) + data_of("grow", 2 * E))
    want[10:21] = b"overwritten"
    assert ns.read(ino, 0, 4 * E) == bytes(want)


def test_a_file_renamed_over_another_has_its_data_recorded_first(mount: Mount) -> None:
    ns = mount.ns
    mount.create(b"config", data_of("old", E))
    new = ns.create(ROOT_INO, b"config.tmp", 0o644, 0, 0).ino
    ns.write(new, 0, data_of("new", E + 100))
    ns.release(new)  # closed, its data handed to the flusher, not fsynced
    ns.rename(ROOT_INO, b"config.tmp", ROOT_INO, b"config")
    ns.fsync(ROOT_INO)  # the directory: commits without waiting for any file's data
    assert _committed_size(mount, new) == E + 100
    mount.remount()
    assert mount.ns.read(mount.ns.lookup(ROOT_INO, b"config").ino, 0, 2 * E) == \
        data_of("new", E + 100)
    # A rename that replaces nothing, or moves a file with nothing buffered, just renames.
    mount.ns.rename(ROOT_INO, b"config", ROOT_INO, b"other")
    assert mount.ns.lookup(ROOT_INO, b"other").ino == new
    # RENAME_EXCHANGE moves both files: the data of each is recorded first.
    ns = mount.ns
    mount.create(b"a", data_of("a0", E))
    b = ns.create(ROOT_INO, b"b", 0o644, 0, 0).ino
    ns.write(b, 0, data_of("b1", E + 7))
    ns.release(b)
    ns.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    ns.fsync(ROOT_INO)
    assert _committed_size(mount, b) == E + 7
