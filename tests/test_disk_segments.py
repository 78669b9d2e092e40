"""Segment files on a directory disk: appends, rollover, freeing with holes, walking,
a vanished disk, and fragments of format-1 pools (a file each) read next to segments."""

from __future__ import annotations

import ctypes
import mmap
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.directory import DIRECT_BUFFER, DIRECT_MIN, DirectoryDisk, FragmentRef
from dynamicfs.disks.label import Label, write_label
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance.fsck import fsck
from dynamicfs.maintenance.gc import SegmentSweeper, compact_segments, segment_ages, tidy_segments
from dynamicfs.maintenance.scrub import scrub
from dynamicfs.namespace.fs import Namespace
from integrity_support import make_pool, read_file, write_files

KiB = 1024


@pytest.fixture
def disk(tmp_path: Path) -> DirectoryDisk:
    root = tmp_path / "d"
    root.mkdir()
    write_label(root, Label("11111111-1111-1111-1111-111111111111",
                            "22222222-2222-2222-2222-222222222222"))
    disk = DirectoryDisk(root, segment_max=64 * KiB)
    disk.prepare()
    return disk


def _unlink_all(pool: Pool, names: list[str]) -> None:
    """Unlink files of the root directory through the namespace, and wait until their
    fragments are freed on the disks."""
    ns = Namespace(pool)
    try:
        for name in names:
            ns.unlink(1, name.encode())
        ns.sync_all()
    finally:
        ns.close()
    pool.store.wait_for_unlinks()


def put(disk: DirectoryDisk, fid: int, payload: bytes) -> FragmentRef:
    header = fragfmt.make_header(7, fid, 0, payload)
    segment, offset = disk.write_fragment(fid, header, payload)
    return FragmentRef(fid, segment, offset, len(header) + len(payload))


def test_records_are_appended_back_to_back_and_roll_over_to_a_new_segment(
        disk: DirectoryDisk) -> None:
    refs = [put(disk, fid, os.urandom(20 * KiB)) for fid in range(1, 8)]
    size = fragfmt.HEADER_SIZE + 20 * KiB
    # Three records fit under 64 KiB; the fourth starts a segment named after it.
    assert [(r.segment, r.offset) for r in refs] == [
        (1, 0), (1, size), (1, 2 * size), (4, 0), (4, size), (4, 2 * size), (7, 0)]
    assert [s.segment for s in disk.segments()] == [1, 4, 7]
    assert [r for r, _ in disk.list_fragments()] == refs
    for ref in refs:
        head, _ = fragfmt.parse(disk.read_fragment(ref))
        assert head.fragment_id == ref.id
    disk.sync(refs)


def test_a_batch_of_records_lands_as_one_by_one_appends_would(disk: DirectoryDisk) -> None:
    payloads = {fid: os.urandom(20 * KiB) for fid in range(1, 8)}
    records = [(fid, fragfmt.make_header(7, fid, 0, p), p) for fid, p in payloads.items()]
    where: list[tuple[int, int]] = []
    disk.write_fragments(records, where)
    size = fragfmt.HEADER_SIZE + 20 * KiB
    # The same places as seven write_fragment() calls: rollover within the batch.
    assert where == [(1, 0), (1, size), (1, 2 * size), (4, 0), (4, size), (4, 2 * size),
                     (7, 0)]
    refs = [FragmentRef(fid, seg, off, size) for fid, (seg, off) in zip(payloads, where,
                                                                         strict=True)]
    assert [r for r, _ in disk.list_fragments()] == refs
    for ref in refs:
        assert fragfmt.parse(disk.read_fragment(ref))[1] == payloads[ref.id]
    # Many small records: more than one pwritev holds (IOV_MAX buffers), none is lost.
    many = [(fid, fragfmt.make_header(7, fid, 0, b"x" * 10), b"x" * 10)
            for fid in range(100, 1700)]
    big = DirectoryDisk(disk.root)
    placed: list[tuple[int, int]] = []
    big.write_fragments(many, placed)
    assert len({seg for seg, _ in placed}) == 1 and len(placed) == len(many)
    assert [o for _, o in placed] == [i * (fragfmt.HEADER_SIZE + 10) for i in range(1600)]
    assert sum(1 for _ in big.records(placed[0][0])) == 1600


def test_a_batch_that_fails_part_way_names_only_what_was_written(disk: DirectoryDisk) -> None:
    first = put(disk, 1, b"a" * 1000)
    records = [(fid, fragfmt.make_header(7, fid, 0, b"b" * (30 * KiB)), b"b" * (30 * KiB))
               for fid in (2, 3, 4)]
    # Two records still fit in segment 1; the third needs segment 4, which cannot be made.
    disk.segment_path(4).write_bytes(b"")
    where: list[tuple[int, int]] = []
    with pytest.raises(FileExistsError):
        disk.write_fragments(records, where)
    size = fragfmt.HEADER_SIZE + 30 * KiB
    assert where == [(1, first.size), (1, first.size + size)]
    for fid, (segment, offset) in zip((2, 3), where, strict=True):
        ref = FragmentRef(fid, segment, offset, size)
        assert fragfmt.parse(disk.read_fragment(ref))[0].fragment_id == fid


def _resident(path: Path, start: int, end: int) -> float:
    """The share of the file's pages in [start, end) that are in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        first, last = start // page, (end + page - 1) // page
        vec = (ctypes.c_ubyte * (last - first))()
        anchor = ctypes.c_char.from_buffer(mm, first * page)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                                ctypes.c_size_t((last - first) * page), vec) == 0
        finally:
            del anchor
    return sum(v & 1 for v in vec) / len(vec)


def test_appended_data_is_sent_to_the_device_and_dropped_from_the_page_cache(
        disk: DirectoryDisk) -> None:
    big = DirectoryDisk(disk.root)
    big.drop_behind = 1024 * KiB
    big.direct = False  # records this large would bypass the page cache altogether
    refs = [put(big, fid, os.urandom(600 * KiB)) for fid in (1, 2)]  # a window: sent
    big.sync(refs)
    refs += [put(big, fid, os.urandom(600 * KiB)) for fid in (3, 4)]  # the next: drops it
    path = big.segment_path(1)
    assert _resident(path, 0, refs[2].offset - 4 * KiB) < 0.1
    assert _resident(path, refs[2].offset + 4 * KiB, refs[3].offset + refs[3].size) > 0.9
    for ref in refs:  # read back from the device
        assert fragfmt.parse(big.read_fragment(ref))[0].fragment_id == ref.id


def test_large_records_bypass_the_page_cache_on_block_boundaries_and_walk_with_small_ones(
        disk: DirectoryDisk) -> None:
    big = DirectoryDisk(disk.root)
    payloads = {1: os.urandom(3 * KiB), 2: os.urandom(DIRECT_MIN + 5),
                3: os.urandom(700), 4: os.urandom(DIRECT_BUFFER + 9 * KiB + 1),
                5: os.urandom(DIRECT_MIN)}
    refs = [put(big, fid, payload) for fid, payload in payloads.items()]
    small, large = refs[0::2], refs[1::2]
    assert refs[0].offset == 0
    assert refs[1].offset == 4 * KiB  # the first boundary after the small record
    for before, ref in zip(refs, refs[1:], strict=False):
        assert ref.offset >= before.offset + before.size
        if ref in large or before in large:
            assert ref.offset % (4 * KiB) == 0
    path = big.segment_path(1)
    for ref in large:  # written to the device, not left in the page cache
        assert _resident(path, ref.offset, ref.offset + ref.size) < 0.1
    assert any(_resident(path, ref.offset, ref.offset + ref.size) > 0.9 for ref in small)
    big.sync(refs)
    for ref in refs:
        head, payload = fragfmt.parse(big.read_fragment(ref))
        assert head.fragment_id == ref.id and payload == payloads[ref.id]
    for ref in large:  # read from the device straight into the buffer: still not cached
        assert _resident(path, ref.offset, ref.offset + ref.size) < 0.1
    assert big.direct_reads
    assert list(big.records(1)) == refs  # the walk skips the padding
    assert list(big.find_problems(refs)) == []
    big.delete_fragment(refs[1])
    assert list(big.records(1)) == [r for r in refs if r != refs[1]]


def test_large_records_asked_not_to_go_direct_are_appended_through_the_page_cache(
        disk: DirectoryDisk) -> None:
    """What a rebuild's workers ask for: each brings one record for the same disk."""
    big = DirectoryDisk(disk.root)
    payloads = {fid: os.urandom(DIRECT_MIN + fid) for fid in (1, 2)}
    refs = []
    for fid, payload in payloads.items():
        header = fragfmt.make_header(7, fid, 0, payload)
        segment, offset = big.write_fragment(fid, header, payload, direct=False)
        refs.append(FragmentRef(fid, segment, offset, len(header) + len(payload)))
    assert refs[1].offset == refs[0].size  # back to back: no padding to a boundary
    path = big.segment_path(1)
    assert _resident(path, 0, refs[1].offset + refs[1].size) > 0.9
    # Still in the page cache, not yet written back: the first starts on a block
    # boundary and is read with O_DIRECT, the second is not, and both read back whole.
    for ref in refs:
        assert fragfmt.parse(big.read_fragment(ref))[1] == payloads[ref.id]
    big.sync(refs)
    for ref in refs:
        assert fragfmt.parse(big.read_fragment(ref))[1] == payloads[ref.id]
    assert list(big.records(1)) == refs


def test_a_filesystem_without_o_direct_gets_large_records_through_the_page_cache(
        tmp_path: Path) -> None:
    root = tmp_path / "ram"
    root.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "ramfs", "none", str(root)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a ramfs (which refuses O_DIRECT) needs root")
    try:
        write_label(root, Label("11111111-1111-1111-1111-111111111111",
                                "22222222-2222-2222-2222-222222222222"))
        mem = DirectoryDisk(root)
        mem.prepare()
        payloads = {fid: os.urandom(DIRECT_MIN * fid) for fid in (1, 2)}
        refs = [put(mem, fid, payload) for fid, payload in payloads.items()]
        assert not mem.direct  # refused: found out once, and not asked again
        assert refs[1].offset == refs[0].size  # back to back, as through the page cache
        mem.sync(refs)
        for ref in refs:
            assert fragfmt.parse(mem.read_fragment(ref))[1] == payloads[ref.id]
        assert not mem.direct_reads  # the first record's read was refused O_DIRECT
        assert list(mem.records(1)) == refs
        mem.close()
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_a_freed_fragment_gives_its_blocks_back_and_is_no_longer_listed(
        disk: DirectoryDisk) -> None:
    big = DirectoryDisk(disk.root)  # 256 MiB segments
    refs = [put(big, fid, os.urandom(1024 * KiB)) for fid in range(10, 13)]
    big.sync(refs)
    before = big.segments()[0].allocated
    big.delete_fragment(refs[1])
    after = big.segments()[0].allocated
    assert before - after >= 1000 * KiB  # the payload's whole blocks are punched out
    assert [r.id for r, _ in big.list_fragments()] == [10, 12]  # walked past the freed one
    with pytest.raises(FileNotFoundError):
        big.read_fragment(refs[1])
    assert big.read_fragment(refs[2])[fragfmt.HEADER_SIZE:] == \
        fragfmt.parse(big.read_fragment(refs[2]))[1].tobytes()
    assert not big.fragment_exists(refs[1]) and big.fragment_exists(refs[0])


def test_a_torn_record_ends_its_segment_and_hides_nothing_before_it(disk: DirectoryDisk) -> None:
    good = put(disk, 1, b"a" * 1000)
    torn = put(disk, 2, b"b" * 1000)
    os.truncate(disk.segment_path(1), torn.offset + 500)  # a crash cut the tail
    assert [r for r, _ in disk.list_fragments()] == [good]
    problems = dict(disk.find_problems([good, torn]))
    assert list(problems) == [torn] and "cut short" in problems[torn]
    # A new open never appends after it: its records go to a segment of their own.
    again = DirectoryDisk(disk.root)
    assert put(again, 3, b"c").segment == 3


def test_a_large_record_cut_short_reads_short(disk: DirectoryDisk) -> None:
    """Read with O_DIRECT, a record the segment cuts short (mid-block) comes back short,
    and fails its check; one whose header is gone is missing."""
    big = DirectoryDisk(disk.root)
    first = put(big, 1, os.urandom(DIRECT_MIN))
    second = put(big, 2, os.urandom(DIRECT_MIN + 3 * KiB))
    assert first.segment == second.segment == 1 and second.offset > 0
    big.sync([first, second])
    os.truncate(big.segment_path(1), second.offset + 5000)
    raw = big.read_fragment(second)
    assert len(raw) == 5000 and big.direct_reads
    with pytest.raises(fragfmt.FragmentError, match="payload has"):
        fragfmt.parse(raw)
    assert len(big.read_fragment(first)) == first.size
    os.truncate(big.segment_path(1), second.offset)
    with pytest.raises(FileNotFoundError):
        big.read_fragment(second)


def test_a_disk_whose_directory_vanished_is_not_written_again(disk: DirectoryDisk,
                                                              tmp_path: Path) -> None:
    ref = put(disk, 1, b"x" * 100)
    disk.sync([ref])
    disk.check_every = 0  # look before every append (else at most every 0.1 s)
    moved = tmp_path / "elsewhere"
    disk.root.rename(moved)
    disk.root.mkdir()  # an empty directory where the disk was: an unmounted mount point
    with pytest.raises(FileNotFoundError):
        put(disk, 2, b"y" * 100)  # the open segment is gone with the disk: no new one here
    assert list(disk.root.iterdir()) == []


def test_a_sync_fails_when_the_segment_vanished_under_it(disk: DirectoryDisk) -> None:
    ref = put(disk, 1, b"x" * 100)
    os.unlink(disk.segment_path(1))
    with pytest.raises(FileNotFoundError):
        disk.sync([ref])


def test_fragments_of_a_format_1_pool_are_read_checked_and_freed_next_to_segments(
        tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=6)
    data = os.urandom(300 * KiB)
    write_files(pool_dir, {"old": data})
    # Turn every fragment of the file into what format 1 wrote: a file of its own, its
    # row without a segment.
    conn = sqlite3.connect(pool_dir / "pool.db")
    rows = conn.execute("SELECT f.id, f.segment, f.offset, f.size, d.path FROM fragments f "
                        "JOIN disks d ON d.id = f.disk_id").fetchall()
    for fid, segment, offset, size, path in rows:
        disk = DirectoryDisk(path)
        ref = FragmentRef(fid, segment, offset, size)
        legacy = disk.legacy_path(fid)
        legacy.parent.mkdir(parents=True, exist_ok=True)
        legacy.write_bytes(disk.read_fragment(ref))
        disk.delete_fragment(ref)
    with conn:
        conn.execute("UPDATE fragments SET segment = NULL, offset = 0")
    conn.close()
    assert read_file(pool_dir, "old") == data
    with Pool.open(pool_dir) as pool:
        assert scrub(pool).clean
        assert fsck(pool).problems == []
        legacy_files = [r for d in pool.backends.values() for r, _ in d.list_fragments()]
        assert len(legacy_files) == len(rows) and all(r.segment is None for r in legacy_files)
    write_files(pool_dir, {"new": data})  # new fragments go to segments
    assert read_file(pool_dir, "new") == data == read_file(pool_dir, "old")
    with Pool.open(pool_dir) as pool:
        _unlink_all(pool, ["old"])
        assert all(not d.legacy_path(fid).exists()
                   for d in pool.backends.values() for fid, *_ in rows)


def test_segments_nothing_lives_in_are_removed_by_the_sweeper_and_the_rest_stay(
        tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=4, policy="replicate:3")
    write_files(pool_dir, {f"small{i}": os.urandom(3000) for i in range(20)})
    write_files(pool_dir, {"kept": b"k" * 5000})  # an open, and segments, of its own
    segments = sorted(tmp_path.glob("disk*/segments/*.seg"))
    with Pool.open(pool_dir) as pool:
        _unlink_all(pool, [f"small{i}" for i in range(20)])
        # Records of 3 KB have no whole block to punch: their space comes back only
        # with their segment. A sweep with the default grace leaves young segments alone.
        assert SegmentSweeper(pool).sweep() == 0
        assert SegmentSweeper(pool, older_than=0).sweep() == 4
    left = sorted(tmp_path.glob("disk*/segments/*.seg"))
    assert len(left) == len(segments) - 4
    assert read_file(pool_dir, "kept") == b"k" * 5000


def test_records_appended_to_a_vanished_disk_are_never_synced(disk: DirectoryDisk,
                                                               tmp_path: Path) -> None:
    disk.check_every = 3600.0  # appends do not look: sync must
    put(disk, 1, b"x" * 100)
    disk.root.rename(tmp_path / "elsewhere")
    disk.root.mkdir()
    late = put(disk, 2, b"y" * 100)
    with pytest.raises(FileNotFoundError):
        disk.sync([late])


def test_mostly_freed_segments_are_compacted_then_removed_and_nothing_is_lost(
        tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=4, policy="replicate:3")
    files = {f"f{i}": os.urandom(3000 + i) for i in range(60)}
    write_files(pool_dir, files)
    kept = [f"f{i}" for i in range(0, 60, 10)]
    old = set(tmp_path.glob("disk*/segments/*.seg"))
    with Pool.open(pool_dir) as pool:
        _unlink_all(pool, [name for name in files if name not in kept])
        held = sum(s.allocated for d in pool.backends.values() for s in d.segments())
        # The default wants 8 MiB of dead space per segment: these hold far less.
        assert tidy_segments(pool, older_than=0) == (0, 0)
        compacted, moved = compact_segments(pool, segment_ages(pool), 0, min_dead=0)
        assert compacted == len(old) and moved == 3 * sum(
            fragfmt.HEADER_SIZE + len(files[name]) for name in kept)
        assert tidy_segments(pool, older_than=0)[0] == len(old)
        assert scrub(pool).clean and fsck(pool).problems == []
        assert sum(s.allocated for d in pool.backends.values() for s in d.segments()) < held
    assert not old & set(tmp_path.glob("disk*/segments/*.seg"))
    for name in kept:
        assert read_file(pool_dir, name) == files[name]


def test_a_move_of_a_fragment_that_changed_meanwhile_leaves_it_where_it_is(
        tmp_path: Path) -> None:
    pool_dir = make_pool(tmp_path, disks=4, policy="replicate:3")
    data = os.urandom(5000)
    write_files(pool_dir, {"f": data})
    with Pool.open(pool_dir) as pool:
        rows = pool.store.load(pool.meta.conn.execute(
            "SELECT id FROM extents").fetchone()[0]).fragments
        disk_id = rows[0].disk_id
        assert pool.store.move_fragments(disk_id, [rows[0]])[0] == 1
        pool.meta.commit()
        # The same row again, as a move that read it before the first one committed.
        assert pool.store.move_fragments(disk_id, [rows[0]]) == (0, 0)
        pool.meta.commit()
        pool.store.wait_for_unlinks()
        listed = [r.id for r, _ in pool.backends[disk_id].list_fragments()]
        assert listed == [rows[0].id]  # one live copy: the stale one was freed
    assert read_file(pool_dir, "f") == data
