"""The extent store: how an extent becomes fragments on disks and back.

Write path: checksum -> encode -> place -> write fragments, one task per disk, in
parallel -> (later, at group commit) sync -> one metadata commit. Read path: read the
fewest fragments (data shards first for EC; for replicas the healthiest, least busy
copy), verify every fragment against its header and the metadata, decode, verify the
extent checksum; fall back to other fragments on any failure. Rebuild re-creates
missing, bad or displaced fragments on other disks and swaps the metadata atomically.

Invariants kept here:
1. fragments of one extent on distinct disks (placement excludes used disks; the
   schema has UNIQUE(extent_id, disk_id));
2. fragments are appended once to segment files (disks/directory.py) under
   never-reused ids; the metadata records where (segment, offset);
3. every fragment written is synced by the before-commit hook before any metadata
   naming it commits; freed fragments are freed on their disks only after the commit;
4. every byte returned has been checked: fragment checksum and extent checksum;
6. an extent is stored with at least policy.minimum fragments or not at all.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from sqlite3 import Connection
from typing import TYPE_CHECKING, NamedTuple

import blake3

from dynamicfs.disks import fragment as fragfmt
from dynamicfs.disks.directory import SYNCFS_THRESHOLD, FragmentRef
from dynamicfs.disks.health import COUNTS_FOR_REDUNDANCY, HEALTHY, SUSPECT
from dynamicfs.errors import FsError, NoSpaceError, UnreadableError
from dynamicfs.meta.schema import LOST_EXTENT
from dynamicfs.observability.log import warn
from dynamicfs.placement.placement import Candidate, choose_disks
from dynamicfs.redundancy import codecs
from dynamicfs.redundancy.codecs import Payload
from dynamicfs.redundancy.policy import Policy, parse_concrete

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

CACHE_BYTES = 64 * 1024 * 1024
# Extents read ahead at most at once.
READ_AHEAD_MAX = 16
STATVFS_TTL = 1.0
# A healthy disk with this many errors within SUSPECT_WINDOW seconds becomes suspect
# (ZFS's diagnosis engine uses the same 10 errors in 10 minutes).
SUSPECT_AFTER = 10
SUSPECT_WINDOW = 600.0
# Bytes of fragments queued for one disk before they go to a writer thread (256 KiB:
# a task per ec:4+2 fragment; 2 MiB wrote 1 GiB through the mount 10-20% faster).
WRITE_BATCH = 2 * 1024 * 1024
# Fragment writes of at most this many bytes in all are done by the calling thread.
INLINE_WRITE = 256 * 1024
# The fragments columns a FragmentRow is built from, in its field order.
FRAGMENT_COLUMNS = "id, extent_id, idx, disk_id, size, checksum, segment, offset"


@dataclass
class FragmentRow:
    id: int
    extent_id: int
    index: int
    disk_id: int
    size: int
    checksum: bytes
    segment: int | None = None  # where on its disk: see FragmentRef
    offset: int = 0

    @property
    def ref(self) -> FragmentRef:
        return FragmentRef(self.id, self.segment, self.offset, self.size)


@dataclass
class ExtentInfo:
    id: int
    length: int
    checksum: bytes
    policy: Policy
    fragments: list[FragmentRow] = field(default_factory=list)


@dataclass
class WrittenExtent:
    """Fragments on disk, not yet durable nor referenced by metadata."""

    info: ExtentInfo


@dataclass
class RebuiltExtent:
    """A rebuild's fragments on disk (durable at the next commit), not yet recorded:
    ExtentStore.prepare_rebuild() makes it, record_rebuilt() switches the metadata."""

    info: ExtentInfo  # as loaded before the rebuild
    kept: int  # fragments that stay where they are
    new_rows: list[FragmentRow]  # the re-created fragments
    retire: list[FragmentRow]  # rows the new ones replace, or on disks gone for good


class FragmentRead(NamedTuple):
    """What reading one fragment gave (ExtentStore.read_fragment)."""

    payload: Payload | None  # None: unreadable, or it failed a check
    size: int  # bytes read from the disk
    problem: str  # why there is no payload: "missing", "unreadable (...)", "corrupt (...)"


def check_fragment(row: FragmentRow, raw: bytes | memoryview, *,
                   hash_payload: bool = True) -> memoryview:
    """The payload of a fragment's bytes, if intact and the fragment the metadata names;
    raises FragmentError saying what is wrong otherwise. Without hash_payload, only the
    header and the length are checked (see fragfmt.parse)."""
    head, payload = fragfmt.parse(raw, hash_payload=hash_payload)
    if (head.extent_id, head.fragment_id, head.index) != (row.extent_id, row.id, row.index):
        raise fragfmt.FragmentError("header names another fragment")
    if head.checksum != row.checksum:
        raise fragfmt.FragmentError("checksum differs from the metadata")
    if len(raw) != row.size:
        raise fragfmt.FragmentError(f"{len(raw)} bytes, the metadata says {row.size}")
    return payload


def _where(row: FragmentRow, problem: str) -> str:
    return f"fragment {row.index} on disk {row.disk_id}: {problem}"


class ExtentCache:
    """Decoded extents by id. Extents are immutable, so entries never go stale."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._items: collections.OrderedDict[int, Payload] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, extent_id: int) -> Payload | None:
        with self._lock:
            data = self._items.get(extent_id)
            if data is not None:
                self._items.move_to_end(extent_id)
            return data

    def put(self, extent_id: int, data: Payload) -> None:
        if len(data) > self.limit // 4:
            return
        with self._lock:
            if extent_id in self._items:
                return
            self._items[extent_id] = data
            self.size += len(data)
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)

    def contains(self, extent_id: int) -> bool:
        with self._lock:
            return extent_id in self._items

    def drop(self, extent_id: int) -> None:
        with self._lock:
            data = self._items.pop(extent_id, None)
            if data is not None:
                self.size -= len(data)


class PendingWrite:
    """Fragment writes started by ExtentStore.start_write()."""

    def __init__(self, store: ExtentStore, plans: list[tuple[ExtentInfo, list[Payload]]],
                 candidates: list[Candidate], futures: list[tuple[int, Future[None]]],
                 failed: dict[int, OSError] | None) -> None:
        self._store, self._plans, self._candidates = store, plans, candidates
        self._futures, self._failed = futures, failed

    def result(self) -> list[WrittenExtent]:
        """Wait for the writes; fragments whose disk failed the write are written to
        other disks. On failure nothing is left behind (no live fragments, no space
        charged) and the error is raised."""
        store = self._store
        try:
            failed = self._failed if self._failed is not None else store._collect(self._futures)
            if failed:
                store._replace_failed(self._plans, failed, self._candidates)
        except BaseException:
            store._abandon(self._plans, self._futures)
            raise
        return [WrittenExtent(info) for info, _ in self._plans]


class ExtentStore:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.meta = pool.meta
        self.executor = ThreadPoolExecutor(max_workers=max(4, 2 * len(pool.disks) + 2),
                                           thread_name_prefix="dynamicfs-io")
        self.cache = ExtentCache()
        # Read-ahead has its own threads, each reading its extent's fragments itself (no
        # hop to `executor`: measured faster, as the threads already overlap extents).
        self._ahead_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dynamicfs-ahead")
        self._ahead: dict[int, Future[Payload]] = {}
        # Freed fragments are freed on their disks here, after their commit: giving blocks
        # back costs the filesystem time that commits need not wait for.
        self._deleter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynamicfs-unlink")
        self._ahead_lock = threading.Lock()
        self._unsynced: dict[int, list[FragmentRef]] = collections.defaultdict(list)
        # Guards _unsynced; a sync in flight (_syncing) makes other syncs wait, and a
        # failed one (_sync_failed) fails the next before-commit sync, so no transaction
        # naming its fragments can commit (invariant 3); a rollback clears it.
        self._unsynced_lock = threading.Condition()
        self._syncing = False
        self._sync_failed = False
        self._busy: collections.Counter[int] = collections.Counter()
        self._statvfs: dict[int, tuple[float, int]] = {}
        self._devices: dict[int, int] = {}
        self.repair_wanted: set[int] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        self._recent_errors: dict[int, collections.deque[float]] = {}
        self._counted: set[tuple[int, int]] = set()
        self._repair_lock = threading.Lock()
        self.meta.presync.append(self.sync_pending)
        self.meta.before_commit.append(self.sync_pending)
        self.meta.after_rollback.append(self._forget_sync_failure)

    def close(self) -> None:
        self._ahead_pool.shutdown(wait=True)
        self._deleter.shutdown(wait=True)
        self.executor.shutdown(wait=True)

    def wait_for_unlinks(self) -> None:
        """Return once every fragment freed by a commit so far is freed on its disk."""
        try:
            self._deleter.submit(lambda: None).result()
        except RuntimeError:  # shut down: nothing is left to wait for
            pass

    # -- capacity ------------------------------------------------------------
    def device_of(self, disk_id: int) -> int:
        """The st_dev of the filesystem a disk's directory is on (a negative number of
        its own when that cannot be told)."""
        dev = self._devices.get(disk_id)
        if dev is None:
            try:
                dev = self.pool.backends[disk_id].device_id()
            except (OSError, KeyError):
                dev = -disk_id
            self._devices[disk_id] = dev
        return dev

    def sharing_filesystem(self, disk_id: int, among: Iterable[int] | None = None) -> list[int]:
        """The pool's other disks (of `among`, if given) on the filesystem this disk is on."""
        dev = self.device_of(disk_id)
        return sorted(d for d in (self.pool.disks if among is None else among)
                      if d != disk_id and self.device_of(d) == dev)

    def disk_free(self, disk_id: int) -> int:
        """Bytes the pool may still put on this disk. Disks on one filesystem share its
        free space: each healthy one (and this one) is counted for an equal part of it,
        so capacity, statfs and the room checks before writes count it once."""
        info = self.pool.disks[disk_id]
        now = time.monotonic()
        cached = self._statvfs.get(disk_id)
        if cached is None or now - cached[0] > STATVFS_TTL:
            try:
                fs_free = self.pool.backends[disk_id].free_bytes()
            except OSError:
                fs_free = 0
            cached = (now, fs_free)
            self._statvfs[disk_id] = cached
        fs_free = cached[1]
        fs_free //= 1 + len(self.sharing_filesystem(
            disk_id, [d.id for d in self.pool.healthy_disks()]))
        if info.capacity is not None:
            return max(0, min(info.capacity - info.used, fs_free))
        return fs_free

    def disk_capacity(self, disk_id: int) -> int:
        info = self.pool.disks[disk_id]
        if info.capacity is not None:
            return info.capacity
        return info.used + self.disk_free(disk_id)

    def _candidates(self) -> list[Candidate]:
        disks = sorted(self.pool.healthy_disks(), key=lambda d: d.used)
        return [Candidate(d.id, self.disk_free(d.id), d.tier) for d in disks]

    # -- write path ------------------------------------------------------------
    def write(self, items: list[tuple[bytes, Policy]]) -> list[WrittenExtent]:
        """Encode, place and write extents; durable at the next commit, not referenced yet.

        Writes start while later extents are still being encoded: a disk's fragments go
        to a worker as soon as WRITE_BATCH bytes are queued for it.
        """
        return self.start_write(items).result()

    def start_write(self, items: list[tuple[bytes, Policy]]) -> PendingWrite:
        """write() up to the point where every fragment write has started: the caller
        may encode its next extents while these reach the disks, then takes the outcome
        from result(). Raises at once what placement refuses (NoSpaceError)."""
        candidates = self._candidates()
        plans: list[tuple[ExtentInfo, list[Payload]]] = []
        queued: dict[int, list[tuple[FragmentRow, Payload]]] = collections.defaultdict(list)
        queued_bytes: collections.Counter[int] = collections.Counter()
        futures: list[tuple[int, Future[None]]] = []
        try:
            for data, policy in items:
                info, payloads = self._plan(data, policy, candidates)
                plans.append((info, payloads))
                for row in info.fragments:
                    queued[row.disk_id].append((row, payloads[row.index]))
                    queued_bytes[row.disk_id] += row.size
                    if queued_bytes[row.disk_id] >= WRITE_BATCH:
                        futures.append((row.disk_id, self.executor.submit(
                            self._write_fragments, row.disk_id, queued.pop(row.disk_id))))
                        queued_bytes[row.disk_id] = 0
            if futures:
                for disk_id, work in queued.items():
                    futures.append((disk_id, self.executor.submit(self._write_fragments,
                                                                  disk_id, work)))
                return PendingWrite(self, plans, candidates, futures, None)
            return PendingWrite(self, plans, candidates, [], self._write_per_disk(queued))
        except BaseException:
            self._abandon(plans, futures)
            raise

    def _abandon(self, plans: list[tuple[ExtentInfo, list[Payload]]],
                 futures: list[tuple[int, Future[None]]]) -> None:
        """A write that fails leaves nothing behind: no live fragments, no space charged."""
        wait([f for _, f in futures])
        self.discard([WrittenExtent(info) for info, _ in plans])

    def _plan(self, data: bytes, policy: Policy,
              candidates: list[Candidate]) -> tuple[ExtentInfo, list[Payload]]:
        payloads = codecs.encode(policy, data)
        size = fragfmt.HEADER_SIZE + len(payloads[0])
        chosen = choose_disks(candidates, policy.width, size)
        if len(chosen) < policy.minimum:
            raise NoSpaceError(f"no room for {policy}: {len(chosen)} healthy disks with "
                               f"free space, {policy.minimum} needed; add disks or free space")
        checksum = blake3.blake3(data).digest()
        info = ExtentInfo(self.pool.new_extent_id(), len(data), checksum, policy)
        for index, disk_id in enumerate(chosen):
            # An EC fragment's checksum is computed by its disk's writer (_write_fragments),
            # so the fragments of an extent are hashed in parallel.
            fsum = checksum if policy.kind == "replicate" else b""
            info.fragments.append(FragmentRow(self.pool.new_fragment_id(), info.id, index,
                                              disk_id, size, fsum))
            self._charge(candidates, disk_id, size)
        return info, payloads

    def _charge(self, candidates: list[Candidate], disk_id: int, size: int) -> None:
        for c in candidates:
            if c.disk_id == disk_id:
                c.free -= size
        self.pool.disks[disk_id].used += size

    def _write_fragments(self, disk_id: int, work: list[tuple[FragmentRow, Payload]],
                         direct: bool = True) -> None:
        records = []
        for row, payload in work:
            if not row.checksum:
                row.checksum = fragfmt.checksum(payload)
            header = fragfmt.FragmentHeader(row.extent_id, row.id, row.index,
                                            len(payload), row.checksum).pack()
            records.append((row.id, header, payload))
        where: list[tuple[int, int]] = []
        try:
            self.pool.backends[disk_id].write_fragments(records, where, direct=direct)
        finally:
            # On failure, those written have a location (to be freed), the rest none.
            info = self.pool.disks[disk_id]
            for (row, _), (segment, offset) in zip(work, where, strict=False):
                row.segment, row.offset = segment, offset
                info.writes += 1
                info.bytes_written += row.size
        with self._unsynced_lock:
            self._unsynced[disk_id].extend(row.ref for row, _ in work)

    def _collect(self, futures: list[tuple[int, Future[None]]]) -> dict[int, OSError]:
        """Wait for fragment writes; returns the disks whose writes failed."""
        return self._failures([(disk_id, fut.exception()) for disk_id, fut in futures])

    def _failures(self, outcomes: list[tuple[int, BaseException | None]]) -> dict[int, OSError]:
        """The disks whose fragment writes failed (counted against them); other errors
        are raised."""
        failed: dict[int, OSError] = {}
        for disk_id, exc in outcomes:
            if isinstance(exc, OSError):
                if disk_id not in failed:
                    self.note_disk_error(disk_id, "write", str(exc))
                failed[disk_id] = exc
            elif exc is not None:
                raise exc
        return failed

    @staticmethod
    def _write_inline(per_disk: dict[int, list[tuple[FragmentRow, Payload]]]) -> bool:
        """Whether these writes are best done by the calling thread: nothing worth
        overlapping (for a few small files thread hand-offs cost more than the writes)."""
        total = sum(row.size for work in per_disk.values() for row, _ in work)
        return len(per_disk) == 1 or total <= INLINE_WRITE

    def _write_per_disk(self, per_disk: dict[int, list[tuple[FragmentRow, Payload]]],
                        direct: bool = True) -> dict[int, OSError]:
        """One task per disk; returns the disks whose writes failed. `direct`: see
        DirectoryDisk.write_fragments."""
        if self._write_inline(per_disk):
            outcomes: list[tuple[int, BaseException | None]] = []
            for disk_id, work in per_disk.items():
                try:
                    self._write_fragments(disk_id, work, direct)
                except OSError as exc:
                    outcomes.append((disk_id, exc))
            return self._failures(outcomes)
        return self._collect([(d, self.executor.submit(self._write_fragments, d, w, direct))
                              for d, w in per_disk.items()])

    def _replace_failed(self, plans: list[tuple[ExtentInfo, list[Payload]]],
                        failed: dict[int, OSError], candidates: list[Candidate]) -> None:
        """Move fragments that failed to write to other disks, or drop them (invariant 6)."""
        bad = set(failed)
        candidates = [c for c in candidates if c.disk_id not in bad]
        for info, payloads in plans:
            keep = [r for r in info.fragments if r.disk_id not in bad]
            lost = [r for r in info.fragments if r.disk_id in bad]
            for row in lost:
                self.pool.disks[row.disk_id].used -= row.size
                self._unlink_unrecorded([row])
                used = {r.disk_id for r in keep}
                for disk_id in choose_disks(candidates, 1, row.size, exclude=used):
                    new = FragmentRow(self.pool.new_fragment_id(), info.id, row.index, disk_id,
                                      row.size, row.checksum)
                    if not self._write_per_disk({disk_id: [(new, payloads[row.index])]}):
                        self._charge(candidates, disk_id, row.size)
                        keep.append(new)
                    else:
                        self._unlink_unrecorded([new])  # a short write leaves part of a record
                        candidates = [c for c in candidates if c.disk_id != disk_id]
            info.fragments = sorted(keep, key=lambda r: r.index)
            if len(keep) < info.policy.minimum:
                codes = {e.errno for e in failed.values()}
                if codes <= {errno.ENOSPC, errno.EDQUOT}:
                    raise NoSpaceError(f"disks are full: only {len(keep)} of "
                                       f"{info.policy.minimum} fragments of {info.policy} fit")
                raise FsError(errno.EIO, f"only {len(keep)} fragments written, "
                                         f"{info.policy.minimum} needed")

    def record(self, conn: Connection, written: Iterable[WrittenExtent]) -> None:
        """Insert the rows that name written extents (inside the caller's write())."""
        now = time.time()
        rows: list[FragmentRow] = []
        for w in written:
            info = w.info
            conn.execute("INSERT INTO extents (id, length, checksum, policy, created) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (info.id, info.length, info.checksum, str(info.policy), now))
            rows.extend(info.fragments)
        self.record_fragments(conn, rows)

    def store(self, conn: Connection, items: list[tuple[bytes, Policy]]) -> list[int]:
        """write() + record(): the extent ids, in order."""
        written = self.write(items)
        self.record(conn, written)
        return [w.info.id for w in written]

    def trim_buffers(self) -> None:
        """Let go of encoding buffers no write used since the last call (every commit
        interval: a daemon done writing gives their memory back)."""
        codecs.trim_buffers()

    def discard(self, written: Iterable[WrittenExtent]) -> None:
        """Forget written-but-unrecorded extents (their fragments are freed now)."""
        for w in written:
            for r in w.info.fragments:
                self.pool.disks[r.disk_id].used -= r.size
            self._unlink_unrecorded(w.info.fragments)

    def _unlink_unrecorded(self, rows: list[FragmentRow]) -> None:
        """Free fragments no metadata names, and stop waiting to sync them."""
        gone = {r.ref for r in rows}
        with self._unsynced_lock:
            # A sync in flight may have taken these already: let it finish before they
            # are freed (a legacy fragment file unlinked under it would fail it, and a
            # failed sync rolls back the whole transaction).
            while self._syncing:
                self._unsynced_lock.wait()
            for disk_id in {r.disk_id for r in rows} & set(self._unsynced):
                self._unsynced[disk_id] = [f for f in self._unsynced[disk_id] if f not in gone]
        for r in rows:
            try:
                self.pool.backends[r.disk_id].delete_fragment(r.ref)
            except (OSError, KeyError):
                pass  # left behind as an orphan, for the garbage collector

    def sync_pending(self) -> None:
        """Make every fragment written since the last sync durable (commit hook)."""
        with self._unsynced_lock:
            while self._syncing:
                self._unsynced_lock.wait()
            if self._sync_failed:
                raise FsError(errno.EIO, "a fragment sync failed; the changes that named "
                                         "its fragments are rolled back")
            pending, self._unsynced = self._unsynced, collections.defaultdict(list)
            if not pending:
                return
            self._syncing = True
        synced = False
        try:
            self._sync(pending)
            synced = True
        finally:
            with self._unsynced_lock:
                self._syncing = False
                self._sync_failed = self._sync_failed or not synced
                self._unsynced_lock.notify_all()

    def _forget_sync_failure(self) -> None:
        with self._unsynced_lock:
            self._sync_failed = False

    def _sync(self, pending: dict[int, list[FragmentRef]]) -> None:
        by_device: dict[int, list[int]] = collections.defaultdict(list)
        for disk_id in pending:
            try:
                by_device[self.pool.backends[disk_id].device_id()].append(disk_id)
            except (OSError, KeyError):
                by_device[-disk_id].append(disk_id)
        futures = []
        for disks in by_device.values():
            total = sum(len({r.segment for r in pending[d]}) for d in disks)
            if total > SYNCFS_THRESHOLD:  # one syncfs of the shared filesystem covers all
                futures.append(self.executor.submit(self.pool.backends[disks[0]].sync_filesystem))
            else:
                for d in disks:
                    futures.append(self.executor.submit(self.pool.backends[d].sync, pending[d]))
        for fut in futures:
            fut.result()

    # -- read path --------------------------------------------------------------
    def load(self, extent_id: int) -> ExtentInfo:
        info = self.load_many((extent_id,)).get(extent_id)
        if info is None:
            raise UnreadableError(f"extent {extent_id} is not in the metadata")
        return info

    def read(self, extent_id: int) -> Payload:
        """The extent's bytes, verified; UnreadableError (EIO) if that is impossible."""
        data = self.cache.get(extent_id)
        if data is not None:
            return data
        with self._ahead_lock:
            ahead = self._ahead.get(extent_id)
        if ahead is not None:
            try:
                return ahead.result()
            except Exception:  # read it again below, and report that
                pass
        return self._read_uncached(extent_id)

    def _read_uncached(self, extent_id: int, parallel: bool = True) -> Payload:
        info = self.load(extent_id)
        data = self._read_verified(info, parallel)
        self.cache.put(extent_id, data)
        return data

    def prefetch(self, extent_ids: Iterable[int]) -> None:
        """Start reading these extents into the cache (read-ahead); returns at once."""
        for extent_id in extent_ids:
            if self.cache.contains(extent_id):
                continue
            with self._ahead_lock:
                if extent_id in self._ahead or len(self._ahead) >= READ_AHEAD_MAX:
                    continue
                self._ahead[extent_id] = self._ahead_pool.submit(self._read_ahead, extent_id)

    def _read_ahead(self, extent_id: int) -> Payload:
        try:
            return self._read_uncached(extent_id, parallel=False)
        finally:
            with self._ahead_lock:
                self._ahead.pop(extent_id, None)

    def _read_order(self, info: ExtentInfo) -> list[FragmentRow]:
        disks = self.pool.disks
        rows = [r for r in info.fragments if r.disk_id in disks and disks[r.disk_id].readable]

        def key(r: FragmentRow) -> tuple[int, int, int]:
            parity = 1 if r.index >= info.policy.k else 0
            state = 0 if disks[r.disk_id].state == "healthy" else 1
            return (parity if info.policy.kind == "ec" else 0, state, self._busy[r.disk_id])

        return sorted(rows, key=key)

    def _read_verified(self, info: ExtentInfo, parallel: bool = True) -> Payload:
        order = self._read_order(info)
        need = info.policy.k
        good: dict[int, Payload] = {}
        problems: list[str] = []
        tried: list[FragmentRow] = []
        if info.policy.kind == "ec" and sorted(r.index for r in order[:need]) == list(range(need)):
            tried = order[:need]  # the data fragments, all there
            joined = self._read_joined(info, tried, good, problems, parallel)
            if joined is not None:
                return joined
        rest = [r for r in order if r not in tried]
        problems += [why for _, why in self._read_until_k(info, rest, good, parallel)]
        missing = info.policy.width - len(order)
        if problems or missing > 0:
            self.want_repair(info.id)
        if len(good) < need:
            detail = "; ".join(problems) or "no readable fragment"
            raise UnreadableError(f"extent {info.id}: {len(good)} of {need} needed fragments "
                                  f"good ({detail})")
        if info.policy.kind == "replicate":
            # A replica is the extent itself: check_fragment has compared its BLAKE3 with
            # the recorded fragment checksum, which for a replica is the extent checksum
            # (both set from one digest at write). Hashing it again computes the same.
            index, payload = next(iter(good.items()))
            recorded = next(r.checksum for r in info.fragments if r.index == index)
            if recorded == info.checksum and len(payload) == info.length:
                return payload
        joined = codecs.join_data(info.policy, good, info.length) if info.policy.kind == "ec" \
            else None
        if joined is not None and blake3.blake3(joined).digest() == info.checksum:
            return joined
        data = codecs.decode(info.policy, good, info.length)
        if blake3.blake3(data).digest() != info.checksum:
            raise UnreadableError(f"extent {info.id}: decoded bytes fail the extent checksum")
        return data

    def _read_joined(self, info: ExtentInfo, data_rows: list[FragmentRow],
                     good: dict[int, Payload], problems: list[str], parallel: bool
                     ) -> bytes | None:
        """An ec extent as its k data fragments' data parts joined, checked by one hash
        of the result against the extent checksum. The fragments' own hashes would
        check the same bytes a second time (measured: half the hashing of an ec read);
        they are computed only when the joined bytes fail or a fragment is missing, to
        find which fragment is bad. Fragments that pass go into `good`, the reasons of
        those that do not into `problems`; None when the extent needs more fragments."""
        unhashed: list[tuple[FragmentRow, Payload]] = []
        for row, got in self._read_rows(data_rows, parallel, hash_payload=False):
            if got.payload is None:
                problems.append(_where(row, got.problem))
            else:
                unhashed.append((row, got.payload))
        if len(unhashed) == info.policy.k:
            joined = codecs.join_data(info.policy, {r.index: p for r, p in unhashed},
                                      info.length)
            if joined is not None and blake3.blake3(joined).digest() == info.checksum:
                return joined
        for row, payload in unhashed:
            if fragfmt.checksum(payload) == row.checksum:
                good[row.index] = payload
            else:
                self._note_corrupt(row, "payload checksum mismatch")
                problems.append(_where(row, "corrupt (payload checksum mismatch)"))
        return None

    def read_fragment(self, row: FragmentRow, *, hash_payload: bool = True) -> FragmentRead:
        """One fragment's payload if it passes every check (else why not), and the bytes
        read; a failure counts against the disk. Without hash_payload the caller checks
        the payload itself (see check_fragment). Reads, repairs and scrub all read here."""
        backend = self.pool.backends.get(row.disk_id)
        if backend is None:
            return FragmentRead(None, 0, "the disk is gone")
        self._busy[row.disk_id] += 1
        try:
            raw = backend.read_fragment(row.ref)
        except FileNotFoundError:
            self.note_disk_error(row.disk_id, "missing", f"fragment {row.id:x} missing", row.id)
            return FragmentRead(None, 0, "missing")
        except OSError as exc:
            self.note_disk_error(row.disk_id, "read", str(exc), row.id)
            return FragmentRead(None, 0, f"unreadable ({exc.strerror})")
        finally:
            self._busy[row.disk_id] -= 1
        disk = self.pool.disks.get(row.disk_id)
        if disk is not None:
            disk.reads += 1
            disk.bytes_read += len(raw)
        try:
            payload = check_fragment(row, raw, hash_payload=hash_payload)
        except fragfmt.FragmentError as exc:
            self._note_corrupt(row, str(exc))
            return FragmentRead(None, len(raw), f"corrupt ({exc})")
        return FragmentRead(payload, len(raw), "")

    def _note_corrupt(self, row: FragmentRow, why: str) -> None:
        self.note_disk_error(row.disk_id, "checksum", f"fragment {row.id:x}: {why}", row.id)

    # -- health bookkeeping ------------------------------------------------------
    def note_disk_error(self, disk_id: int, kind: str, detail: str,
                        fragment_id: int | None = None) -> None:
        """Count an error against a disk; past the threshold a healthy disk turns suspect
        (no new fragments; the background rebuilder moves its data away). A fragment
        found bad again (re-read by a retry, a scrub or a rebuild) counts only once."""
        info = self.pool.disks.get(disk_id)
        if info is None:
            return
        if fragment_id is not None:
            if (disk_id, fragment_id) in self._counted:
                return
            if len(self._counted) > 100_000:
                self._counted.clear()
            self._counted.add((disk_id, fragment_id))
        column = {"write": "write_errors", "checksum": "checksum_errors",
                  "read": "read_errors", "missing": "read_errors"}[kind]
        setattr(info, column, getattr(info, column) + 1)
        recent = self._recent_errors.setdefault(disk_id, collections.deque())
        now = time.monotonic()
        recent.append(now)
        while recent and now - recent[0] > SUSPECT_WINDOW:
            recent.popleft()
        suspect = info.state == HEALTHY and len(recent) >= SUSPECT_AFTER
        with self.meta.write() as conn:
            conn.execute(f"UPDATE disks SET {column} = {column} + 1 WHERE id = ?", (disk_id,))
            if suspect:
                info.state = SUSPECT
                info.reason = (f"{len(recent)} read, write or checksum errors within "
                               f"{SUSPECT_WINDOW / 60:.0f} minutes")
                conn.execute("UPDATE disks SET state = ?, reason = ? WHERE id = ?",
                             (info.state, info.reason, disk_id))
        warn("fragment error", disk=disk_id, kind=kind, detail=detail)
        if suspect:
            recent.clear()
            warn("disk is now suspect", disk=disk_id, reason=info.reason)

    def forget_errors(self, disk_id: int) -> None:
        """An operator reset the disk's state: its error window starts afresh."""
        self._recent_errors.pop(disk_id, None)

    def want_repair(self, extent_id: int) -> None:
        with self._repair_lock:
            self.repair_wanted.add(extent_id)

    # -- freeing -------------------------------------------------------------------
    def free_if_unreferenced(self, conn: Connection, extent_ids: Iterable[int]) -> int:
        """Delete extents no file refers to; their fragments are freed after the commit.
        (LOST_EXTENT, the mark of a chunk whose write-back failed, is no extent.)"""
        freed = 0
        for extent_id in set(extent_ids) - {LOST_EXTENT}:
            if conn.execute("SELECT 1 FROM file_extents WHERE extent_id = ? LIMIT 1",
                            (extent_id,)).fetchone():
                continue
            self.delete_extent(conn, extent_id)
            freed += 1
        return freed

    def delete_extent(self, conn: Connection, extent_id: int) -> None:
        rows = conn.execute("SELECT disk_id, id, segment, offset, size FROM fragments "
                            "WHERE extent_id = ?", (extent_id,)).fetchall()
        conn.execute("DELETE FROM fragments WHERE extent_id = ?", (extent_id,))
        conn.execute("DELETE FROM extents WHERE id = ?", (extent_id,))
        conn.execute("DELETE FROM repair_queue WHERE extent_id = ?", (extent_id,))
        self._release_fragments(conn, [(r[0], FragmentRef(*r[1:])) for r in rows])
        self.cache.drop(extent_id)

    def _release_fragments(self, conn: Connection, rows: list[tuple[int, FragmentRef]]) -> None:
        """Account for fragment rows (disk id, where) just deleted; free them on their
        disks after the commit."""
        per_disk: collections.Counter[int] = collections.Counter()
        for disk_id, ref in rows:
            per_disk[disk_id] += ref.size
        conn.executemany("UPDATE disks SET used = MAX(0, used - ?) WHERE id = ?",
                         [(n, d) for d, n in per_disk.items()])
        for disk_id, n in per_disk.items():
            if disk_id in self.pool.disks:
                self.pool.disks[disk_id].used = max(0, self.pool.disks[disk_id].used - n)
        self._free_after_commit(rows)

    def _free_after_commit(self, rows: list[tuple[int, FragmentRef]]) -> None:
        """Free these fragments (disk id, where) on their disks once the current
        transaction has committed, on the background deleter."""

        def unlink() -> None:
            for disk_id, ref in rows:
                backend = self.pool.backends.get(disk_id)
                disk = self.pool.disks.get(disk_id)
                if backend is None or disk is None or not disk.readable:
                    # A failed disk is not written to: if it comes back, what is left
                    # there is orphaned, and the garbage collector frees it.
                    continue
                try:
                    backend.delete_fragment(ref)
                except OSError:
                    pass  # an unreachable disk: left for the garbage collector

        def unlink_later() -> None:
            try:
                self._deleter.submit(unlink)
            except RuntimeError:  # the store is closing
                unlink()

        self.meta.after_commit(unlink_later)

    # -- rebuild -------------------------------------------------------------------
    def redundancy_of(self, info: ExtentInfo) -> int:
        """Fragments that count: on disks that still hold data for the pool."""
        disks = self.pool.disks
        return sum(1 for r in info.fragments
                   if r.disk_id in disks and disks[r.disk_id].state in COUNTS_FOR_REDUNDANCY)

    def rebuild(self, extent_id: int, *, evacuate: frozenset[int] = frozenset(),
                verify: bool = True, parallel: bool = True) -> str:
        """Bring an extent back to full redundancy on healthy disks: prepare_rebuild()
        then record_rebuilt(). Returns 'healthy' (nothing to do), 'repaired', 'partial'
        (better but still under-redundant), 'stuck' (no fragment could be placed),
        'stale' (the extent's fragments changed while it was being rebuilt: nothing was
        changed, try again) or raises UnreadableError when fewer than k good fragments
        are left. Counts go into `stats` (rebuild_attempts, _done, _failed)."""
        prepared = self.prepare_rebuild(self.load(extent_id), evacuate=evacuate,
                                        verify=verify, parallel=parallel)
        if isinstance(prepared, str):
            return prepared
        with self.meta.write() as conn:
            return self.record_rebuilt(conn, prepared)

    def load_many(self, extent_ids: Iterable[int]) -> dict[int, ExtentInfo]:
        """load() for many extents under one metadata lock; ids not found are left out."""
        ids = sorted(set(extent_ids))
        out: dict[int, ExtentInfo] = {}
        with self.meta.read() as conn:
            for at in range(0, len(ids), 500):  # SQLite's limit on bound parameters
                part = ids[at: at + 500]
                marks = ",".join("?" * len(part))
                for extent_id, length, checksum, policy in conn.execute(
                        f"SELECT id, length, checksum, policy FROM extents WHERE id IN ({marks})",
                        part):
                    out[extent_id] = ExtentInfo(extent_id, length, checksum,
                                                parse_concrete(policy))
                for f in conn.execute(f"SELECT {FRAGMENT_COLUMNS} FROM fragments WHERE "
                                      f"extent_id IN ({marks}) ORDER BY extent_id, idx", part):
                    if f[1] in out:
                        out[f[1]].fragments.append(FragmentRow(*f))
        return out

    def prepare_rebuild(self, info: ExtentInfo, *, evacuate: frozenset[int] = frozenset(),
                        verify: bool = True, parallel: bool = True) -> RebuiltExtent | str:
        """The disk work of a rebuild, without the metadata: the fragments to re-create
        are made and written (durable at the next commit, named by no metadata yet), to
        be recorded by record_rebuilt(); or 'healthy' when there is nothing to do, or
        'stuck' when nothing could be placed and nothing is to be dropped.

        Re-creates fragments that are missing, bad, on disks that do not count for
        redundancy, or on `evacuate` disks. With `verify` every readable fragment is read
        and checked first (the repair of something a read or a scrub found bad); without,
        the metadata says what is missing and only the fragments needed to re-create it
        are read. Callers that rebuild several extents at once on their own threads pass
        parallel=False: the fragments are then read one after another on the caller's
        thread, without thread hops (measured faster for the repair pass). Safe to run on
        several threads at once.
        """
        self.stats["rebuild_attempts"] += 1
        try:
            # Without verify, an ec extent's survivors are first read without hashing
            # them: what is re-created from them is checked against the recorded
            # checksums of the fragments it replaces, which only the right survivors
            # reproduce. Failing that, again with every survivor hashed, to find the bad.
            quick = not verify and info.policy.kind == "ec"
            prepared = self._prepare(info, evacuate, verify, parallel, hash_survivors=not quick)
            if prepared is None:
                prepared = self._prepare(info, evacuate, verify, parallel, hash_survivors=True)
        except UnreadableError:
            self.stats["rebuild_failed"] += 1
            raise
        assert prepared is not None
        return prepared

    def _prepare(self, info: ExtentInfo, evacuate: frozenset[int], verify: bool,
                 parallel: bool, *, hash_survivors: bool) -> RebuiltExtent | str | None:
        """prepare_rebuild(); None when survivors read without hashing
        (hash_survivors=False) did not reproduce the recorded fragments."""
        disks = self.pool.disks
        readable = [r for r in info.fragments
                    if r.disk_id in disks and disks[r.disk_id].readable]
        read = {r.id: got.payload for r, got in self._read_rows(
            [r for r in readable if verify or r.disk_id in evacuate], parallel)}
        good: dict[int, Payload] = {}
        keep: dict[int, FragmentRow] = {}
        drop: list[FragmentRow] = []
        for row in sorted(info.fragments, key=lambda r: r.disk_id in evacuate):
            disk = disks.get(row.disk_id)
            payload = read.get(row.id)
            if payload is not None:
                good.setdefault(row.index, payload)
            # Unread fragments on readable disks are trusted: the metadata says they are there.
            present = payload is not None or (row.id not in read and row in readable)
            stays = (present and disk is not None and disk.state in COUNTS_FOR_REDUNDANCY
                     and row.disk_id not in evacuate and row.index not in keep)
            if stays:
                keep[row.index] = row
            else:
                drop.append(row)
        if len(keep) == info.policy.width:
            return "healthy"
        # A verified fragment that only has to move (evacuate) is copied as it is; the
        # rest is re-created from k good fragments.
        have = {i: good[i] for i in range(info.policy.width) if i not in keep and i in good}
        # Checksums known without hashing again: a fragment read was checked against its
        # row's; a re-created one is hashed once, by _recreate.
        sums = {r.index: r.checksum for r in info.fragments if r.index in have}
        if len(keep) + len(have) < info.policy.width:
            self._top_up_good(info, keep, drop, good, parallel, hash_survivors)
        need = [i for i in range(info.policy.width) if i not in keep and i not in have]
        if need:
            if len(good) < info.policy.k:
                if not hash_survivors:
                    return None
                raise UnreadableError(f"extent {info.id}: {len(good)} of {info.policy.k} "
                                      "needed good fragments left")
            made = self._recreate(info, good, need, sums, hash_survivors)
            if made is None:
                return None
            have.update(made)
        return self._place_rebuilt(info, keep, drop, have, sums)

    def _read_rows(self, rows: list[FragmentRow], parallel: bool = True,
                   hash_payload: bool = True
                   ) -> list[tuple[FragmentRow, FragmentRead]]:
        """Each row with read_fragment()'s answer, in order: read in parallel or, for
        callers that overlap many extents on their own threads, one after another here."""
        if len(rows) <= 1 or not parallel:
            return [(r, self.read_fragment(r, hash_payload=hash_payload)) for r in rows]
        futures = [(r, self.executor.submit(self.read_fragment, r, hash_payload=hash_payload))
                   for r in rows]
        return [(r, f.result()) for r, f in futures]

    def _read_until_k(self, info: ExtentInfo, order: list[FragmentRow],
                      good: dict[int, Payload], parallel: bool, hash_payload: bool = True
                      ) -> list[tuple[FragmentRow, str]]:
        """Read fragments in `order`, as many at a time as are still missing, until
        `good` (index -> payload) holds k; the rows found bad or unreadable, with why.
        Without hash_payload, `good` holds payloads whose hash nobody checked."""
        bad: list[tuple[FragmentRow, str]] = []
        pos = 0
        while len(good) < info.policy.k and pos < len(order):
            batch = order[pos: pos + info.policy.k - len(good)]
            pos += len(batch)
            for row, got in self._read_rows(batch, parallel, hash_payload):
                if got.payload is not None:
                    good.setdefault(row.index, got.payload)
                else:
                    bad.append((row, _where(row, got.problem)))
        return bad

    def _top_up_good(self, info: ExtentInfo, keep: dict[int, FragmentRow],
                     drop: list[FragmentRow], good: dict[int, Payload], parallel: bool,
                     hash_payload: bool = True) -> None:
        """Read kept fragments not read yet until k are good; one found bad is dropped
        (so it is re-created too)."""
        order = [r for r in self._read_order(info)
                 if keep.get(r.index) is r and r.index not in good]
        for row, _ in self._read_until_k(info, order, good, parallel, hash_payload):
            del keep[row.index]
            drop.append(row)

    def _recreate(self, info: ExtentInfo, good: dict[int, Payload], need: list[int],
                  sums: dict[int, bytes], checked: bool = True) -> dict[int, Payload] | None:
        """The payloads at `need`, re-created from good fragments and checked: against the
        lost fragment's recorded checksum when there is one, else by decoding the extent
        and checking its checksum. Their checksums go into `sums`. With `checked` False
        the payloads in `good` were not hashed: None unless every re-created payload
        matches a recorded checksum (an extent code's re-created fragment depends on
        every byte of each of the k fragments it was made from, so only the right ones
        reproduce it)."""
        try:
            made = codecs.reconstruct(info.policy, good, need)
        except UnreadableError:
            if checked:
                raise
            return None  # a bad survivor, perhaps: find it by hashing them
        if info.policy.kind == "replicate":
            return made  # a copy of a fragment whose checksum (the extent's) was checked
        recorded = {r.index: r.checksum for r in info.fragments}
        sums.update((i, fragfmt.checksum(p)) for i, p in made.items())
        if all(recorded.get(i) == sums[i] for i in made):
            return made
        if not checked:
            return None
        data = codecs.decode(info.policy, good, info.length)
        if blake3.blake3(data).digest() != info.checksum:
            raise UnreadableError(f"extent {info.id}: surviving fragments disagree")
        return made

    def _place_rebuilt(self, info: ExtentInfo, keep: dict[int, FragmentRow],
                       drop: list[FragmentRow], payloads: dict[int, Payload],
                       sums: dict[int, bytes]) -> RebuiltExtent | str:
        candidates = self._candidates()
        used = {r.disk_id for r in keep.values()}
        # A dropped row on a readable disk stays unless its index gets a new home; until
        # then its disk may take that index back, but no other one (invariant 1).
        held = [(r.index, r.disk_id) for r in drop
                if r.disk_id in self.pool.disks and self.pool.disks[r.disk_id].readable]
        new_rows: list[FragmentRow] = []
        per_disk: dict[int, list[tuple[FragmentRow, Payload]]] = collections.defaultdict(list)
        for index in sorted(payloads):
            payload = payloads[index]
            size = fragfmt.HEADER_SIZE + len(payload)
            placed = {r.index for r in new_rows}
            blocked = used | {d for i, d in held if i != index and i not in placed}
            chosen = choose_disks(candidates, 1, size, exclude=blocked)
            if not chosen:
                continue
            fsum = info.checksum if info.policy.kind == "replicate" else sums[index]
            row = FragmentRow(self.pool.new_fragment_id(), info.id, index, chosen[0], size, fsum)
            used.add(chosen[0])
            self._charge(candidates, chosen[0], size)
            new_rows.append(row)
            per_disk[chosen[0]].append((row, payload))
        # Repair workers each bring one extent's fragments: through the page cache.
        failed = self._write_per_disk(per_disk, direct=False)
        self.stats["rebuild_bytes"] += sum(r.size for r in new_rows if r.disk_id not in failed)
        unwritten = [r for r in new_rows if r.disk_id in failed]
        while unwritten:
            for row in unwritten:
                self.pool.disks[row.disk_id].used -= row.size
            self._unlink_unrecorded(unwritten)
            new_rows = [r for r in new_rows if r not in unwritten]
            # An index whose write failed keeps its old row, and that row its disk.
            placed = {r.index for r in new_rows}
            staying = {d for i, d in held if i not in placed}
            unwritten = [r for r in new_rows if r.disk_id in staying]
        placed = {r.index for r in new_rows}
        # Old rows for indexes that now have a new home, or that sit on disks that are
        # gone for good, are dropped; the rest stay until a later rebuild can move them.
        retire = [r for r in drop if r.index in placed or r.disk_id not in self.pool.disks
                  or not self.pool.disks[r.disk_id].readable]
        if not new_rows and not retire:
            return "stuck"
        return RebuiltExtent(info, len(keep), new_rows, retire)

    def record_rebuilt(self, conn: Connection, rebuilt: RebuiltExtent) -> str:
        """Switch the metadata to a prepared rebuild (inside the caller's write()):
        'repaired', 'partial' or 'stuck' as for rebuild(); 'stale', with the new
        fragments freed, when the extent was freed, rewritten or rebuilt by someone else
        since it was loaded."""
        info, new_rows = rebuilt.info, rebuilt.new_rows
        now = {row[0] for row in conn.execute(
            "SELECT id FROM fragments WHERE extent_id = ?", (info.id,))}
        if now != {r.id for r in info.fragments}:
            for row in new_rows:
                self.pool.disks[row.disk_id].used -= row.size
            self._unlink_unrecorded(new_rows)
            return "stale"
        retire = rebuilt.retire
        conn.executemany("DELETE FROM fragments WHERE id = ?", [(r.id,) for r in retire])
        self._release_fragments(conn, [(r.disk_id, r.ref) for r in retire])
        self.record_fragments(conn, new_rows)
        conn.execute("DELETE FROM repair_queue WHERE extent_id = ?", (info.id,))
        if not new_rows:
            return "stuck"
        self.stats["rebuild_done"] += 1
        if rebuilt.kept + len(new_rows) < info.policy.width:
            return "partial"
        # Whatever the last scrub found wrong with it is mended now, by whichever repair
        # (health and what-if would otherwise go on counting it until the next scrub).
        conn.execute("UPDATE scrub_problems SET state = 'repaired' WHERE extent_id = ?",
                     (info.id,))
        return "repaired"

    # -- moving fragments between segments ----------------------------------------------
    def move_fragments(self, disk_id: int, rows: list[FragmentRow]) -> tuple[int, int]:
        """Copy fragments of a disk to its active segment and point their rows there
        (compaction of a segment that is mostly freed space); durable at the next commit,
        the old copies freed after it. A fragment found damaged or missing stays where it
        is (scrub and repair deal with it), and so does one whose row changed meanwhile
        (its new copy is freed at once). Returns (fragments moved, bytes moved)."""
        backend = self.pool.backends[disk_id]
        copies: list[tuple[FragmentRow, FragmentRef]] = []  # (row at its new place, old place)
        for row in rows:
            try:
                raw = backend.read_fragment(row.ref)
                check_fragment(row, raw)
            except (OSError, fragfmt.FragmentError):
                continue
            view = memoryview(raw)
            segment, offset = backend.write_fragment(
                row.id, bytes(view[: fragfmt.HEADER_SIZE]), view[fragfmt.HEADER_SIZE:],
                name_segment=self.pool.new_fragment_id)
            copies.append((dataclasses.replace(row, segment=segment, offset=offset), row.ref))
        with self._unsynced_lock:
            self._unsynced[disk_id].extend(new.ref for new, _ in copies)
        moved: list[tuple[int, FragmentRef]] = []
        stale: list[FragmentRow] = []
        with self.meta.write() as conn:
            for new, old in copies:
                cur = conn.execute(
                    "UPDATE fragments SET segment = ?, offset = ? WHERE id = ? AND disk_id = ? "
                    "AND segment IS ? AND offset = ?",
                    (new.segment, new.offset, new.id, disk_id, old.segment, old.offset))
                if cur.rowcount:
                    moved.append((disk_id, old))
                else:
                    stale.append(new)
            self._free_after_commit(moved)
        if stale:
            self._unlink_unrecorded(stale)
        return len(moved), sum(ref.size for _, ref in moved)

    def record_fragments(self, conn: Connection, rows: list[FragmentRow]) -> None:
        conn.executemany(
            "INSERT INTO fragments (id, extent_id, idx, disk_id, size, checksum, segment, "
            "offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.id, r.extent_id, r.index, r.disk_id, r.size, r.checksum, r.segment, r.offset)
             for r in rows])
        per_disk: collections.Counter[int] = collections.Counter()
        for r in rows:
            per_disk[r.disk_id] += r.size
        conn.executemany("UPDATE disks SET used = used + ? WHERE id = ?",
                         [(n, d) for d, n in per_disk.items()])
