"""Garbage collection: orphan fragments, empty segment files, unreferenced extents.

An orphan is a live fragment record on a disk whose id has no `fragments` row for that
disk: left by a crash between writing fragments and committing the metadata that names
them (DESIGN invariant 5), by a write that failed half-way, or by a free that did not
reach the disk. Cleaning it frees it as the store frees a fragment (dead marker,
payload punched out). A segment file no row names any more is removed whole. An
unreferenced extent has no `file_extents` row. A segment that is mostly freed space
(small freed fragments have no whole block to punch out) is compacted: its live
fragments are moved to the disk's active segment, so that it empties.

All are removed only once older than a grace period (default one hour, by the mtime of
the segment file and the extent's creation time). Orphans and extents of the pool's
current open (ids of the current epoch) are never removed: they may be being written
right now by the mount daemon, not yet recorded; nor is the segment the pool is
appending to, nor, whatever the grace asked for, a segment of the current open written
to within the last DEFAULT_GRACE. Failed disks are not listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynamicfs.disks import health
from dynamicfs.disks.directory import DirectoryDisk, FragmentRef, SegmentInfo
from dynamicfs.engine.pool import ID_BITS
from dynamicfs.engine.store import FRAGMENT_COLUMNS, FragmentRow
from dynamicfs.errors import DynamicFSError
from dynamicfs.maintenance.periodic import Periodic
from dynamicfs.observability.log import log, warn

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

DEFAULT_GRACE = 3600.0
# A segment is compacted when at least this many of the bytes it holds, and at least
# half of them, belong to no live fragment.
COMPACT_MIN_DEAD = 8 * 1024 * 1024
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'10m' -> 600.0; units s, m, h, d, w (bare numbers are seconds)."""
    match = _AGE.match(text.lower())
    if not match:
        raise DynamicFSError(f"malformed age {text!r}: use a number with a unit, "
                             "e.g. 0s, 10m, 2h, 7d")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


@dataclass
class OrphanFragment:
    disk_id: int
    fragment_id: int
    path: str  # the file that holds it, with "@offset" for a record of a segment
    size: int
    age: float  # seconds since that file was last modified
    ref: FragmentRef


@dataclass
class UnreferencedExtent:
    extent_id: int
    length: int
    fragments: int
    age: float


@dataclass
class OrphanScan:
    orphans: list[OrphanFragment] = field(default_factory=list)
    extents: list[UnreferencedExtent] = field(default_factory=list)
    # Found but left alone: written by the pool's current open (perhaps in flight).
    current: int = 0
    skipped_disks: list[str] = field(default_factory=list)

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)


@dataclass
class CleanupReport:
    older_than: float
    deleted: int
    deleted_bytes: int
    extents_freed: int
    kept_young: int
    kept_current: int
    errors: list[str]
    skipped_disks: list[str]
    segments_removed: int = 0
    segment_bytes: int = 0  # what the removed segment files held on their filesystems
    segments_compacted: int = 0  # mostly freed: their live fragments moved out first


@dataclass
class DiskOrphans:
    disk_id: int
    path: str
    orphans: int
    bytes: int
    oldest: float
    older_than_grace: int


@dataclass
class OrphanStats:
    disks: list[DiskOrphans]
    orphans: int
    bytes: int
    extents: int
    extent_bytes: int
    current: int
    skipped_disks: list[str]


def _current_epoch(pool: Pool, object_id: int) -> bool:
    return object_id >> ID_BITS >= pool.config.epoch


def find_orphans(pool: Pool) -> OrphanScan:
    """Every orphan fragment and unreferenced extent, whatever its age."""
    scan = OrphanScan()
    now = time.time()
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        if disk.state == health.FAILED:
            scan.skipped_disks.append(f"disk {disk.id} ({disk.path}): failed")
            continue
        backend = pool.backends[disk.id]
        try:
            # List first, then read the rows: a fragment recorded in between is not missed.
            files = list(backend.list_fragments())
        except OSError as exc:
            scan.skipped_disks.append(f"disk {disk.id} ({disk.path}): {exc.strerror}")
            continue
        with pool.meta.read() as conn:
            known = {r[0] for r in conn.execute("SELECT id FROM fragments WHERE disk_id = ?",
                                                (disk.id,))}
        for ref, mtime in files:
            if ref.id in known:
                continue
            if _current_epoch(pool, ref.id):
                scan.current += 1
                continue
            if ref.segment is None:
                path = str(backend.legacy_path(ref.id))
            else:
                path = f"{backend.segment_path(ref.segment)}@{ref.offset}"
            scan.orphans.append(OrphanFragment(disk.id, ref.id, path, ref.size,
                                               max(0.0, now - mtime), ref))
    with pool.meta.read() as conn:
        rows = conn.execute(
            "SELECT e.id, e.length, e.created, (SELECT count(*) FROM fragments f "
            "WHERE f.extent_id = e.id) FROM extents e WHERE NOT EXISTS "
            "(SELECT 1 FROM file_extents x WHERE x.extent_id = e.id) ORDER BY e.id").fetchall()
    for extent_id, length, created, fragments in rows:
        if _current_epoch(pool, extent_id):
            scan.current += 1
            continue
        scan.extents.append(UnreferencedExtent(extent_id, length, fragments,
                                               max(0.0, now - created)))
    return scan


def detect_orphans(pool: Pool) -> OrphanScan:
    return find_orphans(pool)


def cleanup_orphans(pool: Pool, older_than: float = DEFAULT_GRACE) -> CleanupReport:
    """Free orphan fragments, remove empty segments and free unreferenced extents older
    than `older_than` seconds."""
    # Segment ages from before any orphan in them is freed (freeing writes to them).
    ages = segment_ages(pool)
    scan = find_orphans(pool)
    deleted = deleted_bytes = kept = 0
    errors: list[str] = []
    for orphan in scan.orphans:
        if orphan.age < older_than:
            kept += 1
            continue
        fragment_id = orphan.fragment_id
        with pool.meta.read() as conn:  # recorded since the scan: not an orphan after all
            if conn.execute("SELECT 1 FROM fragments WHERE id = ? AND disk_id = ?",
                            (fragment_id, orphan.disk_id)).fetchone():
                continue
        try:
            pool.backends[orphan.disk_id].delete_fragment(orphan.ref)
        except OSError as exc:
            errors.append(f"{orphan.path}: {exc.strerror}")
            continue
        deleted += 1
        deleted_bytes += orphan.size
    compacted, removed, removed_bytes = _tidy(pool, ages, older_than, errors)
    freed = 0
    with pool.meta.write() as conn:
        for extent in scan.extents:
            if extent.age < older_than:
                kept += 1
                continue
            freed += pool.store.free_if_unreferenced(conn, [extent.extent_id])
    if freed or deleted or removed:
        pool.record_event("cleanup-orphans", {"deleted": deleted, "bytes": deleted_bytes,
                                              "extents": freed, "segments": removed})
    pool.meta.commit()
    return CleanupReport(older_than, deleted, deleted_bytes, freed, kept, scan.current, errors,
                         scan.skipped_disks, removed, removed_bytes, compacted)


def compact_segments(pool: Pool, ages: dict[tuple[int, int], float], older_than: float,
                     min_dead: int | None = None) -> tuple[int, int]:
    """Move the live fragments out of segments that are mostly freed space, so that
    those segments empty and can be removed: a segment qualifies when at least
    `min_dead` bytes and half of what it holds on its filesystem are no live fragment's
    (small freed fragments have no whole block to punch out). Only segments that
    removal would take by age, on disks that take writes. Returns (segments compacted,
    bytes of live fragments moved)."""
    min_dead = COMPACT_MIN_DEAD if min_dead is None else min_dead
    compacted = moved_bytes = 0
    for disk_id, _, seg, live in _settled_segments(pool, ages, older_than,
                                                   writable_only=True, errors=None):
        if live is None:
            continue  # empty: removed, not compacted
        dead = seg.allocated - live
        if dead < min_dead or dead < seg.allocated / 2:
            continue
        with pool.meta.read() as conn:
            rows = [FragmentRow(*r) for r in conn.execute(
                f"SELECT {FRAGMENT_COLUMNS} FROM fragments WHERE disk_id = ? "
                "AND segment = ? ORDER BY offset", (disk_id, seg.segment))]
        _, nbytes = pool.store.move_fragments(disk_id, rows)
        pool.meta.commit()
        compacted += 1
        moved_bytes += nbytes
    return compacted, moved_bytes


def _settled_segments(pool: Pool, ages: dict[tuple[int, int], float], older_than: float, *,
                      writable_only: bool, errors: list[str] | None
                      ) -> Iterator[tuple[int, DirectoryDisk, SegmentInfo, int | None]]:
    """Segments old enough for the garbage collector (`_old_enough`) and not taking
    appends, on disks that are not failed (with writable_only, on healthy disks only):
    (disk id, its backend, the segment, bytes of live fragments in it or None when no
    row names it). A disk that cannot be listed is skipped, said in `errors`."""
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        if disk.state == health.FAILED or (writable_only and disk.state != health.HEALTHY):
            continue
        backend = pool.backends[disk.id]
        try:
            segments = backend.segments()
        except OSError as exc:
            if errors is not None:
                errors.append(f"disk {disk.id} ({disk.path}): {exc.strerror}")
            continue
        with pool.meta.read() as conn:
            live = {r[0]: r[1] for r in conn.execute(
                "SELECT segment, sum(size) FROM fragments WHERE disk_id = ? "
                "AND segment IS NOT NULL GROUP BY segment", (disk.id,))}
        for seg in segments:
            if seg.segment == backend.active_segment or not _old_enough(
                    pool, seg.segment, ages.get((disk.id, seg.segment), 0.0), older_than):
                continue
            yield disk.id, backend, seg, live.get(seg.segment)


def _old_enough(pool: Pool, segment: int, age: float, older_than: float) -> bool:
    if age < older_than:
        return False
    # A record written by this open may not be recorded yet.
    return not (_current_epoch(pool, segment) and age < DEFAULT_GRACE)


def segment_ages(pool: Pool) -> dict[tuple[int, int], float]:
    """(disk id, segment) -> seconds since the segment file was last written."""
    now = time.time()
    out = {}
    for disk in pool.disks.values():
        if disk.state == health.FAILED:
            continue
        try:
            segments = pool.backends[disk.id].segments()
        except OSError:
            continue
        out.update({(disk.id, seg.segment): max(0.0, now - seg.mtime) for seg in segments})
    return out


def _remove_empty_segments(pool: Pool, ages: dict[tuple[int, int], float], older_than: float,
                           errors: list[str]) -> tuple[int, int]:
    """Remove segment files no fragment row names; returns (how many, bytes they held)."""
    removed = removed_bytes = 0
    for disk_id, backend, seg, live in _settled_segments(pool, ages, older_than,
                                                         writable_only=False, errors=errors):
        if live is not None:
            continue
        with pool.meta.read() as conn:  # named since the listing: it stays
            if conn.execute("SELECT 1 FROM fragments WHERE disk_id = ? AND segment = ? "
                            "LIMIT 1", (disk_id, seg.segment)).fetchone():
                continue
        try:
            if backend.remove_segment(seg.segment):
                removed += 1
                removed_bytes += seg.allocated
        except OSError as exc:
            errors.append(f"{backend.segment_path(seg.segment)}: {exc.strerror}")
    return removed, removed_bytes


def orphan_stats(pool: Pool, grace: float = DEFAULT_GRACE) -> OrphanStats:
    scan = find_orphans(pool)
    disks = []
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        mine = [o for o in scan.orphans if o.disk_id == disk.id]
        disks.append(DiskOrphans(disk.id, disk.path, len(mine), sum(o.size for o in mine),
                                 round(max((o.age for o in mine), default=0.0), 1),
                                 sum(1 for o in mine if o.age >= grace)))
    return OrphanStats(disks, len(scan.orphans), scan.orphan_bytes, len(scan.extents),
                       sum(e.length for e in scan.extents), scan.current, scan.skipped_disks)


def tidy_segments(pool: Pool, older_than: float = DEFAULT_GRACE) -> tuple[int, int]:
    """Compact mostly freed segments, then remove segment files no fragment row names,
    older than `older_than` seconds (and those of the current open older than
    DEFAULT_GRACE); returns (segments removed, bytes they held) and logs what could not
    be removed."""
    errors: list[str] = []
    _, removed, removed_bytes = _tidy(pool, segment_ages(pool), older_than, errors)
    for err in errors:
        warn("segment not removed", detail=err)
    return removed, removed_bytes


def _tidy(pool: Pool, ages: dict[tuple[int, int], float], older_than: float,
          errors: list[str]) -> tuple[int, int, int]:
    """compact_segments, then _remove_empty_segments: (segments compacted, segments
    removed, bytes they held)."""
    compacted, _ = compact_segments(pool, ages, older_than)
    removed, removed_bytes = _remove_empty_segments(pool, ages, older_than, errors)
    return compacted, removed, removed_bytes


class SegmentSweeper(Periodic):
    """In the mount daemon: every INTERVAL seconds, mostly freed segments are compacted
    and segment files that nothing lives in any more are removed (the space of small
    freed fragments comes back with them)."""

    INTERVAL = 600.0
    THREAD_NAME = "dynamicfs-segments"

    def __init__(self, pool: Pool, interval: float = INTERVAL,
                 older_than: float = DEFAULT_GRACE) -> None:
        super().__init__(interval)
        self.pool = pool
        self.older_than = older_than

    def tick(self) -> int:
        return self.sweep()

    def sweep(self) -> int:
        try:
            removed, held = tidy_segments(self.pool, self.older_than)
        except Exception as exc:  # a background task must not die of one bad pass
            warn("segment sweep failed", reason=str(exc))
            return 0
        if removed:
            log("empty segments removed", segments=removed, bytes=held)
        return removed
