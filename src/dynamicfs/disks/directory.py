"""A disk that is a directory: fragments appended to segment files under `<root>/segments/`.

Owns invariant 2 at the disk level: a fragment is appended once, as a record of a
segment file (docs/FORMAT.md), and never rewritten. A freed fragment's payload blocks
are punched out of its segment (its header stays, so the segment can still be walked
record by record) and a segment that no fragment lives in any more is removed by the
garbage collector. Also the durability half of invariant 3: `sync()` makes the records
written so far, and the directory entries of new segment files, durable; many disks on
one filesystem are made durable by one syncfs(2).

Why segments: on the machines DynamicFS was measured on, creating and filling 1,536
files of 1 MiB cost 1.6-3.7 s of system time (ext4 inode allocation, a new file's
delayed allocation), appending the same bytes to six files 0.4-0.5 s.

Pools written before segments keep fragments in files of their own under
`<root>/fragments/<xx>/<id>.frag`: those are read, checked, listed and deleted as
before (a FragmentRef with segment None), never written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.label import LABEL_NAME, Label, LabelError, read_label
from dynamicfs.memory import buffer_address

SEGMENT_DIR = "segments"
LEGACY_DIR = "fragments"
# A segment takes appends until it holds this many bytes; the next write starts another.
SEGMENT_MAX = 256 << 20
# How often (seconds) an append checks that the disk directory is still where it was.
CHECK_EVERY = 0.1
# Above this many segment files to sync on one filesystem, one syncfs() beats one
# fsync() per file. Only a rare commit reaches it (a commit names the few segments
# written since the last one): syncfs also writes whatever else on that filesystem is
# dirty (a 1 GiB file just copied there made a commit 0.5 s longer).
SYNCFS_THRESHOLD = 64
_PROBE_NAME = ".dynamicfs-probe"
_BLOCK = 4096
# Buffers per pwritev (the kernel's IOV_MAX is 1024): 512 records.
IOV_MAX = 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
# Bytes appended to a segment between two calls of _drop_behind.
DROP_BEHIND = 16 << 20
# Records of at least this many bytes bypass the page cache (O_DIRECT, see
# _append_direct); they start on a 4096-byte boundary and are padded with zeros to one
# (at most 1.5% more space for them: an ec:4+2 fragment of a 1 MiB extent qualifies).
DIRECT_MIN = 256 << 10
# The aligned staging buffer of a disk's direct writes: records are copied into it and
# written from it, this many bytes at most per write.
DIRECT_BUFFER = (4 << 20) + _BLOCK
_ZEROS = bytes(_BLOCK)  # padding


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give the blocks of a byte range back to the filesystem (they read as zeros);
    False where the filesystem cannot."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))


def fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FragmentRef(NamedTuple):
    """Where a fragment lives on its disk: `size` bytes (header and payload) at `offset`
    of segment `segment`. Segment None: a fragment file of its own (older pools)."""

    id: int
    segment: int | None
    offset: int
    size: int


@dataclass(frozen=True)
class SegmentInfo:
    segment: int
    size: int  # bytes appended
    allocated: int  # bytes the filesystem holds for it (punched payloads excluded)
    mtime: float


@dataclass(frozen=True)
class ProbeResult:
    state: str | None  # None: fine; otherwise the health state the disk deserves
    reason: str


class DirectoryDisk:
    """Fragment storage in a directory. Thread-safe: every method may run concurrently;
    appends to the disk are serialised, so a segment has no gap but the zero padding
    up to a 4096-byte boundary ahead of a record written with O_DIRECT."""

    def __init__(self, root: Path | str, *, segment_max: int = SEGMENT_MAX) -> None:
        self.root = Path(root)
        self.segment_root = self.root / SEGMENT_DIR
        self.legacy_root = self.root / LEGACY_DIR
        self.segment_max = segment_max
        self._append = threading.Lock()
        self._active: int | None = None  # the segment appends go to; None until the first
        self._active_fd = -1
        self._end = 0
        self._kicked = self._dropped = 0  # offsets in the active segment: _drop_behind
        self.direct = True  # large records with O_DIRECT; off where the filesystem refuses
        self._direct_fd = -1  # the active segment opened with O_DIRECT, once needed
        self.direct_reads = True  # large aligned records with O_DIRECT (see _read_direct)
        self._staging: mmap.mmap | None = None
        self._staging_at: ctypes.c_char | None = None
        self._new_entries = False  # a segment file was created since the last sync
        self.check_every = CHECK_EVERY
        self.drop_behind = DROP_BEHIND
        self._checked = 0.0  # when the active segment was last found at its path

    def __repr__(self) -> str:
        return f"DirectoryDisk({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------
    def segment_path(self, segment: int) -> Path:
        return self.segment_root / f"{segment:016x}.seg"

    def legacy_path(self, fragment_id: int) -> Path:
        return self.legacy_root / f"{fragment_id & 0xFF:02x}" / f"{fragment_id:016x}.frag"

    def prepare(self) -> None:
        """Create the segment directory, durably (add-disk)."""
        self.segment_root.mkdir(exist_ok=True)
        fsync_path(self.segment_root, directory=True)
        fsync_path(self.root, directory=True)

    # -- appending -------------------------------------------------------------
    @property
    def active_segment(self) -> int | None:
        return self._active

    def write_fragment(self, fragment_id: int, header: bytes, payload: bytes | memoryview,
                       *, name_segment: Callable[[], int] | None = None,
                       direct: bool = True) -> tuple[int, int]:
        """Append the fragment to the active segment (not yet durable: call sync()).
        Returns (segment, offset). A segment started by this write is named after the
        fragment, or by `name_segment()` (a fresh id: a fragment moved to another
        segment may have named the one it comes from). `direct`: see write_fragments."""
        where: list[tuple[int, int]] = []
        self.write_fragments([(fragment_id, header, payload)], where, name_segment=name_segment,
                             direct=direct)
        return where[0]

    def write_fragments(self, records: Sequence[tuple[int, bytes, bytes | memoryview]],
                        where: list[tuple[int, int]], *,
                        name_segment: Callable[[], int] | None = None,
                        direct: bool = True) -> None:
        """Append records (fragment id, header, payload) in order, as write_fragment()
        would one by one, but with one pwritev for as many as fit in the active segment
        (many small fragments: one system call instead of one each). Each record's
        (segment, offset) goes to `where` once it is written: when a write fails, `where`
        names those written before it. The records of the failed pwritev are in a
        segment that ends there; any of them that reached the disk whole is an orphan
        for the garbage collector.

        Large records go out with O_DIRECT (see _append_direct) unless `direct` is
        False: then through the page cache, for callers that bring one record at a time
        from several threads (a rebuild's workers, all writing to the new disk), where
        each O_DIRECT write would hold the append lock until the device answers while
        the others queue behind it (a rebuild took 1.8-1.9 s that way, 1.25-1.6 s
        through the page cache)."""
        with self._append:
            i = 0
            while i < len(records):
                if direct and self._is_direct(records[i]):
                    i = self._append_direct(records, i, where, name_segment)
                else:
                    i = self._append_buffered(records, i, where, name_segment)
            if self.drop_behind and self._end - self._kicked >= self.drop_behind:
                self._drop_behind()

    def _is_direct(self, record: tuple[int, bytes, bytes | memoryview]) -> bool:
        return self.direct and len(record[1]) + len(record[2]) >= DIRECT_MIN

    def _room_for(self, start: int, size: int, fragment_id: int,
                  name_segment: Callable[[], int] | None) -> int:
        """Seal the active segment if `size` bytes at `start` would take it past
        segment_max (a first record always fits) or it vanished; start one if there is
        none. Returns where the record goes: `start`, or 0 in a new segment."""
        if self._active is not None and ((self._end and start + size > self.segment_max)
                                         or not self._still_there()):
            self._seal()
        if self._active is None:
            self._start_segment(fragment_id if name_segment is None else name_segment())
            return 0
        return start

    def _append_buffered(self, records: Sequence[tuple[int, bytes, bytes | memoryview]],
                         i: int, where: list[tuple[int, int]],
                         name_segment: Callable[[], int] | None) -> int:
        """Append records from i on through the page cache, in one pwritev, up to the
        next record for _append_direct; returns the index after the last one written."""
        start = self._room_for(self._end, len(records[i][1]) + len(records[i][2]),
                               records[i][0], name_segment)
        segment = self._active
        assert segment is not None
        buffers: list[bytes | memoryview] = []
        offsets: list[tuple[int, int]] = []
        end, j = start, i
        while j < len(records) and len(buffers) < IOV_MAX:
            _, header, payload = records[j]
            size = len(header) + len(payload)
            if j > i and (end + size > self.segment_max or self._is_direct(records[j])):
                break
            buffers += (header, payload)
            offsets.append((segment, end))
            end += size
            j += 1
        try:
            _pwrite_all(self._active_fd, buffers, start)
        except BaseException:
            self._seal()  # a torn record ends its segment: the next write starts another
            raise
        self._end = end
        where += offsets
        return j

    def _append_direct(self, records: Sequence[tuple[int, bytes, bytes | memoryview]],
                       i: int, where: list[tuple[int, int]],
                       name_segment: Callable[[], int] | None) -> int:
        """Append large records from i on with O_DIRECT, each from a 4096-byte boundary
        and padded with zeros to the next one (so whatever follows starts on one too):
        as many as fit in the staging buffer go out in one write. Returns the index
        after the last one written.

        Why: through the page cache, the kernel's copy into pages, ext4's per-page
        delayed allocation and the write-back threads cost 1.6-2.8 s of system time per
        GiB of fragments here; staging the records in an aligned buffer and writing
        them with O_DIRECT cost 0.3 s (the copy) and 0.1 s. Through the mount, 1 GiB
        written under ec:4+2 took the same time either way but 5% less CPU in all (the
        daemon's system time fell by 30%), and it no longer churns the page cache.
        Durability is unchanged: the commit's fsync still flushes the device's cache and
        the file's metadata. A filesystem that refuses O_DIRECT (ramfs, say) gets every
        record through the page cache from then on."""
        padded = _round_up(len(records[i][1]) + len(records[i][2]))
        start = self._room_for(_round_up(self._end), padded, records[i][0], name_segment)
        segment = self._active
        assert segment is not None
        parts: list[bytes | memoryview] = []
        offsets: list[tuple[int, int]] = []
        end, j = start, i
        while j < len(records) and self._is_direct(records[j]):
            _, header, payload = records[j]
            padded = _round_up(len(header) + len(payload))
            if j > i and (end + padded > self.segment_max or end + padded - start > DIRECT_BUFFER):
                break
            parts += (header, payload, memoryview(_ZEROS)[: padded - len(header) - len(payload)])
            offsets.append((segment, end))
            end += padded
            j += 1
        try:
            if self._direct_fd < 0:
                self._direct_fd = os.open(self.segment_path(segment), os.O_WRONLY | os.O_DIRECT)
            self._write_staged(parts, start)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                self._seal()  # a torn record ends its segment: the next write starts another
                raise
            # O_DIRECT refused by this filesystem: these records and all after them go
            # through the page cache (over whatever of them was written).
            self.direct = False
            self._close_direct()
            return i
        except BaseException:
            self._seal()
            raise
        self._end = end
        where += offsets
        return j

    def _write_staged(self, parts: list[bytes | memoryview], start: int) -> None:
        """Write the concatenation of `parts` (a multiple of 4096 bytes long) at `start`
        through the O_DIRECT descriptor, copied into the aligned staging buffer and
        written from it, DIRECT_BUFFER bytes at a time. Parts that are bytes or writable
        memoryviews (erasure-coded fragments) are copied by ctypes.memmove, which lets
        other threads run meanwhile."""
        if self._staging is None:
            self._staging = mmap.mmap(-1, DIRECT_BUFFER)  # page-aligned, as O_DIRECT needs
            self._staging_at = ctypes.c_char.from_buffer(self._staging)  # its address
        assert self._staging_at is not None
        base = ctypes.addressof(self._staging_at)
        stage = memoryview(self._staging)
        try:
            pos = filled = 0  # bytes written; bytes in the buffer
            for part in parts:
                source = buffer_address(part)
                done = 0
                while done < len(part):
                    take = min(len(part) - done, DIRECT_BUFFER - filled)
                    if source is not None:
                        ctypes.memmove(base + filled, source + done, take)
                    else:
                        stage[filled: filled + take] = part[done: done + take]
                    filled += take
                    done += take
                    if filled == DIRECT_BUFFER:
                        self._write_stage(stage, filled, start + pos)
                        pos += filled
                        filled = 0
            if filled:
                self._write_stage(stage, filled, start + pos)
        finally:
            stage.release()

    def _write_stage(self, stage: memoryview, n: int, offset: int) -> None:
        written = os.pwrite(self._direct_fd, stage[:n], offset)
        if written < n:  # the rest, unaligned now, through the page cache
            _pwrite_all(self._active_fd, [stage[written:n]], offset + written)

    def _drop_behind(self) -> None:
        """Start writing the newest appended bytes to the device, and take the bytes
        started last time out of the page cache.

        Without it, writing 1 GiB under replicate:3 leaves 3 GiB of dirty pages until
        the commit's fsync, on pages the machine may never have touched (measured here:
        half the write time was the kernel copying into fresh page-cache pages, and the
        fsync then had the whole 3 GiB to write). With it, the device works while data
        still comes in and the same few pages are reused; a fragment read back soon
        comes from the disk instead (the mount's own page cache holds file data anyway).
        Neither call waits for the device nor reports its errors: fsync at the commit
        does (pages still under writeback are simply not dropped)."""
        fd = self._active_fd
        try:
            if self._kicked > self._dropped:
                os.posix_fadvise(fd, self._dropped, self._kicked - self._dropped,
                                 os.POSIX_FADV_DONTNEED)
                self._dropped = self._kicked
            sync_file_range(fd, self._kicked, self._end - self._kicked, _SYNC_FILE_RANGE_WRITE)
        except OSError:
            pass  # only a hint: the commit's fsync writes and checks everything
        self._kicked = self._end

    def _start_segment(self, name: int) -> None:
        # Named after the first fragment written to it: fragment ids are never reused, so
        # neither are segment names. A new process never appends to an older segment.
        if not self.segment_root.is_dir():
            # A disk from before segments gets its directory now; but never a disk whose
            # directory vanished (an unmounted mount point, say): no label, no write.
            if not (self.root / LABEL_NAME).is_file():
                raise FileNotFoundError(errno.ENOENT, f"{self.root}: the disk label is missing")
            self.segment_root.mkdir(exist_ok=True)
        self._active_fd = os.open(self.segment_path(name),
                                  os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._active = name
        self._end = self._kicked = self._dropped = 0
        self._new_entries = True
        self._checked = time.monotonic()

    def _still_there(self) -> bool:
        """Whether the active segment is still the file at its path: a disk directory
        that vanished (renamed, deleted, its filesystem unmounted) must not take more
        records through a descriptor opened before. Looked at most every `check_every`
        seconds (a path lookup per small fragment cost as much as writing it); a record
        written in between is caught by sync(), which reaches segments by path, so the
        metadata never names it."""
        assert self._active is not None
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return True
        self._checked = now
        try:
            there = os.stat(self.segment_path(self._active))
        except OSError:
            return False
        mine = os.fstat(self._active_fd)
        return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)

    def _seal(self) -> None:
        if self._active_fd >= 0:
            os.close(self._active_fd)
        self._close_direct()
        self._active, self._active_fd, self._end = None, -1, 0

    def _close_direct(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = -1

    def close(self) -> None:
        with self._append:
            self._seal()

    # -- durability -------------------------------------------------------------
    def sync(self, refs: Iterable[FragmentRef]) -> None:
        """Make these fragments, and every segment file created so far, durable."""
        segments = {r.segment for r in refs if r.segment is not None}
        with self._append:
            new, self._new_entries = self._new_entries, False
        try:
            for segment in segments:
                # By path, not by the appending descriptor: a segment that vanished since
                # it was written fails here, before any metadata names its records.
                fsync_path(self.segment_path(segment))
            if new:
                fsync_path(self.segment_root, directory=True)
                fsync_path(self.root, directory=True)
        except BaseException:
            with self._append:
                self._new_entries = self._new_entries or new
            raise

    def sync_filesystem(self) -> None:
        """syncfs(2) of the disk's filesystem: everything written there becomes durable."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    # -- reading and freeing -------------------------------------------------------
    def read_fragment(self, ref: FragmentRef) -> bytes | memoryview:
        """The fragment's bytes (header and payload); fewer than ref.size when its segment
        is shorter. FileNotFoundError when its segment or file is gone.

        A large record on a 4096-byte boundary (as _append_direct leaves them) is read
        with O_DIRECT, straight into the buffer it is returned in (see _read_direct)."""
        if ref.segment is None:
            with open(self.legacy_path(ref.id), "rb", buffering=0) as f:
                return f.read()
        raw: bytes | memoryview | None = None
        if self.direct_reads and ref.size >= DIRECT_MIN and ref.offset % _BLOCK == 0:
            raw = self._read_direct(ref)
        if raw is None:
            fd = os.open(self.segment_path(ref.segment), os.O_RDONLY)
            try:
                raw = os.pread(fd, ref.size, ref.offset)  # short only where the segment ends
            finally:
                os.close(fd)
        if len(raw) < fragfmt.HEADER_SIZE or _absent(raw[: fragfmt.HEADER_SIZE]):
            # Nothing there: the segment ends before it, or see _absent.
            raise FileNotFoundError(errno.ENOENT, f"fragment {ref.id:x} is not in segment "
                                                  f"{ref.segment:016x}")
        return raw

    def _read_direct(self, ref: FragmentRef) -> memoryview | None:
        """The record read with O_DIRECT into a 4096-byte aligned stretch of a new buffer
        (from the process heap, which keeps reused memory: see dynamicfs.memory), or None
        where the filesystem refuses O_DIRECT (then never tried again on this disk).

        Why: through the page cache, the kernel copies every fragment out of pages that
        the device has just filled, and on this kind of virtual machine that copy of
        pages fresh from the host ran at 0.6-3 GB/s. Reading a cold 1 GiB file through
        the mount, three interleaved pairs each: under replicate:3 the daemon spent
        5.0-6.1 s of CPU (a third of it in that copy) and took 3.1-3.7 s, with O_DIRECT
        1.5-3.3 s of CPU and 1.35-2.3 s; under ec:4+2, where the kernel's read-ahead
        makes larger requests of the page cache's reads, 2.9-3.6 s of CPU and 1.9-2.4 s
        one hour, 4.7-5.1 s and 3.0-3.3 s another, with O_DIRECT 2.3-3.2 s and 2.0-2.4 s
        both times. With O_DIRECT the device writes into the buffer itself."""
        assert ref.segment is not None
        length = _round_up(ref.size)
        buffer = bytearray(length + _BLOCK)
        address = buffer_address(buffer)
        assert address is not None
        start = -address % _BLOCK
        view = memoryview(buffer)[start: start + length]
        try:
            fd = os.open(self.segment_path(ref.segment), os.O_RDONLY | os.O_DIRECT)
            try:
                got = os.preadv(fd, [view], ref.offset)  # short only where the segment ends
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct_reads = False  # O_DIRECT refused by this filesystem
            return None
        return view[: min(got, ref.size)]

    def delete_fragment(self, ref: FragmentRef) -> None:
        """Free a fragment: its file goes, or its record in its segment is marked freed
        (FREED_MAGIC; the rest of the header stays, so the segment remains walkable) and
        its payload's whole blocks are punched out, giving their space back."""
        if ref.segment is None:
            try:
                os.unlink(self.legacy_path(ref.id))
            except FileNotFoundError:
                pass
            return
        try:
            fd = os.open(self.segment_path(ref.segment), os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            head = fragfmt.parse_header(os.pread(fd, fragfmt.HEADER_SIZE, ref.offset),
                                        freed_ok=True)
            if head.fragment_id != ref.id:
                return  # not the record it was: leave the segment alone
            os.pwrite(fd, fragfmt.FREED_MAGIC, ref.offset)
            start = -(-(ref.offset + fragfmt.HEADER_SIZE) // _BLOCK) * _BLOCK
            end = (ref.offset + ref.size) // _BLOCK * _BLOCK
            if end > start:  # else no whole block of its own: freed with its segment
                punch_hole(fd, start, end - start)
        except fragfmt.FragmentError:
            return  # a damaged record: the garbage collector's business
        finally:
            os.close(fd)

    def fragment_exists(self, ref: FragmentRef) -> bool:
        """Whether the fragment's bytes are there and its header names it (payload unchecked)."""
        return not any(True for _ in self.find_problems([ref]))

    def find_problems(self, refs: Iterable[FragmentRef]) -> Iterator[tuple[FragmentRef, str]]:
        """The fragments among `refs` that are missing, cut short, or whose header does
        not name them, each with what is wrong (payloads are not read: scrub does that).
        Each segment file is opened once."""
        by_segment: dict[int | None, list[FragmentRef]] = {}
        for ref in refs:
            by_segment.setdefault(ref.segment, []).append(ref)
        for ref in by_segment.pop(None, []):
            try:
                actual = self.legacy_path(ref.id).stat().st_size
            except FileNotFoundError:
                yield ref, "missing"
                continue
            if actual != ref.size:
                yield ref, f"has {actual} bytes, {ref.size} recorded"
        for segment, group in by_segment.items():
            assert segment is not None
            try:
                fd = os.open(self.segment_path(segment), os.O_RDONLY)
            except FileNotFoundError:
                for ref in group:
                    yield ref, f"missing (segment {segment:016x} is gone)"
                continue
            try:
                size = os.fstat(fd).st_size
                for ref in group:
                    if size < ref.offset + ref.size:
                        yield ref, (f"cut short (segment {segment:016x} ends at byte {size}, "
                                    f"the fragment at {ref.offset + ref.size})")
                        continue
                    raw = os.pread(fd, fragfmt.HEADER_SIZE, ref.offset)
                    if _absent(raw):
                        yield ref, "missing (freed, or never written)"
                        continue
                    try:
                        head = fragfmt.parse_header(raw)
                    except fragfmt.FragmentError as exc:
                        yield ref, f"header: {exc}"
                        continue
                    if head.fragment_id != ref.id:
                        yield ref, f"header names fragment {head.fragment_id}"
                    elif fragfmt.HEADER_SIZE + head.length != ref.size:
                        yield ref, (f"has {fragfmt.HEADER_SIZE + head.length} bytes, "
                                    f"{ref.size} recorded")
            finally:
                os.close(fd)

    # -- listing -------------------------------------------------------------------
    def segments(self) -> list[SegmentInfo]:
        out = []
        try:
            entries = list(os.scandir(self.segment_root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not entry.name.endswith(".seg"):
                continue
            try:
                segment = int(entry.name[:-4], 16)
                st = entry.stat()
            except (ValueError, FileNotFoundError):
                continue
            out.append(SegmentInfo(segment, st.st_size, st.st_blocks * 512, st.st_mtime))
        return sorted(out, key=lambda s: s.segment)

    def records(self, segment: int) -> Iterator[FragmentRef]:
        """The live (not freed) fragments of a segment, walked header by header (zeros
        where a header would start, before a 4096-byte boundary, are padding). The walk
        stops at a torn or damaged header: what follows it is not listed (so never taken
        for garbage)."""
        try:
            fd = os.open(self.segment_path(segment), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset + fragfmt.HEADER_SIZE <= size:
                raw = os.pread(fd, fragfmt.HEADER_SIZE, offset)
                if offset % _BLOCK and not any(raw[:8]):
                    offset = _round_up(offset)  # padding before a record written direct
                    continue
                try:
                    head = fragfmt.parse_header(raw, freed_ok=True)
                except fragfmt.FragmentError:
                    return
                total = fragfmt.HEADER_SIZE + head.length
                if offset + total > size:
                    return
                if raw[:8] != fragfmt.FREED_MAGIC:
                    yield FragmentRef(head.fragment_id, segment, offset, total)
                offset += total
        finally:
            os.close(fd)

    def list_fragments(self) -> Iterator[tuple[FragmentRef, float]]:
        """Every fragment on the disk, with the mtime of the file that holds it."""
        for seg in self.segments():
            for ref in self.records(seg.segment):
                yield ref, seg.mtime
        if not self.legacy_root.is_dir():
            return
        for sub in os.scandir(self.legacy_root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                if name.endswith(".frag"):
                    try:
                        st = entry.stat()
                        yield FragmentRef(int(name[:-5], 16), None, 0, st.st_size), st.st_mtime
                    except (ValueError, FileNotFoundError):
                        continue

    def remove_segment(self, segment: int) -> bool:
        """Unlink a segment (the caller knows nothing lives there); never the active one."""
        with self._append:
            if segment == self._active:
                return False
        try:
            os.unlink(self.segment_path(segment))
        except FileNotFoundError:
            pass
        return True

    # -- the disk as a whole ---------------------------------------------------
    def device_id(self) -> int:
        return os.stat(self.root).st_dev

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def read_label(self) -> Label:
        return read_label(self.root)

    def probe(self, pool_uuid: str, disk_uuid: str) -> ProbeResult:
        """Check the disk is present, labelled for this pool and readable/writable."""
        if not self.root.is_dir():
            return ProbeResult("failed", f"directory {self.root} is missing")
        try:
            label = self.read_label()
        except LabelError as exc:
            return ProbeResult("failed", f"{LABEL_NAME}: {exc}")
        if label.pool_uuid != pool_uuid or label.disk_uuid != disk_uuid:
            return ProbeResult("failed", "label belongs to another pool or disk")
        probe = self.root / _PROBE_NAME
        data = os.urandom(4096)
        try:
            with open(probe, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with open(probe, "rb") as f:
                back = f.read()
            os.unlink(probe)
        except OSError as exc:
            state = "suspect" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "failed"
            return ProbeResult(state, f"read/write probe failed: {exc.strerror}")
        if back != data:
            return ProbeResult("suspect", "read/write probe returned different bytes")
        return ProbeResult(None, "ok")


def _absent(header: bytes | memoryview) -> bool:
    """Whether a record's header says no fragment is there: freed, or all zeros (bytes
    that never reached the disk: a crash can leave a file longer than what was written
    to it)."""
    return header[:8] == fragfmt.FREED_MAGIC or not any(header)


def _round_up(offset: int) -> int:
    return -(-offset // _BLOCK) * _BLOCK


def _pwrite_all(fd: int, buffers: list[bytes | memoryview], offset: int) -> None:
    total = sum(len(b) for b in buffers)
    written = os.pwritev(fd, buffers, offset)
    if written == total:
        return
    rest = memoryview(b"".join(bytes(b) for b in buffers))[written:]
    offset += written
    while rest:
        n = os.pwrite(fd, rest, offset)
        rest = rest[n:]
        offset += n
