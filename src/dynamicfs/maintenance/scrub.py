"""Scrub: read every fragment of every extent and check that the pool still holds it.

Per extent: every fragment row is read and checked on its own (header checksum, magic,
extent/fragment id and index, payload length and BLAKE3, and the checksum the
metadata holds); the rows are checked against the policy (one per index, no index
beyond the width, distinct disks) and against the disks (present, labelled for this
pool, not failed); the good fragments are decoded and the result checked against the
extent's checksum. The verdict is healthy, under-redundant (readable, but fewer good
fragments than the policy asks), unreadable (fewer than k good fragments), or, with
`repair`, repaired by ExtentStore.rebuild (which never decodes from fewer than k good
fragments). Extents left under-redundant go to the repair queue.

Reading is what a scrub spends its time on, so extents are checked by a pool of
worker threads (fragments of different extents sit on different disks, so every disk
is kept busy), batch after batch, the next batch queued while one is being judged.

A scrub is resumable: after every batch the last extent id checked and the running
counts go to `scrub_state` (one row) and the problems found to `scrub_problems`, and
are committed; a scrub that did not finish continues from there unless restarted.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import blake3

from dynamicfs.disks import health
from dynamicfs.disks.label import LabelError, read_label
from dynamicfs.engine.store import FRAGMENT_COLUMNS, ExtentInfo, FragmentRow
from dynamicfs.errors import DynamicFSError, UnreadableError
from dynamicfs.meta.paths import PathResolver
from dynamicfs.redundancy import codecs
from dynamicfs.redundancy.codecs import Payload
from dynamicfs.redundancy.policy import parse_concrete

if TYPE_CHECKING:
    from collections.abc import Callable

    from dynamicfs.engine.pool import Pool

    Progress = Callable[[int, int, str], None]

HEALTHY = "healthy"
UNDER_REDUNDANT = "under-redundant"
REPAIRED = "repaired"
UNREADABLE = "unreadable"

# Extents per batch: the unit of progress, of resumption and of commits.
BATCH = 256
# Batches queued ahead of the one being judged.
AHEAD = 2
MAX_WORKERS = 32
# Problem extents a report lists (all are counted and kept in scrub_problems).
MAX_LISTED = 1000


@dataclass
class ExtentCheck:
    """What checking one extent found."""

    extent_id: int
    length: int
    fragment_bytes: int
    state: str
    problems: list[str] = field(default_factory=list)
    fragment_ids: frozenset[int] = frozenset()

    @property
    def detail(self) -> str:
        return "; ".join(self.problems)


@dataclass
class DiskCheck:
    id: int
    path: str
    state: str
    problem: str


@dataclass
class ExtentProblem:
    extent_id: int
    state: str
    detail: str
    paths: list[str]


@dataclass
class ScrubReport:
    started: float
    finished: float | None
    resumed: bool
    repair: bool
    checked: int
    bytes: int
    fragment_bytes: int
    healthy: int
    under_redundant: int
    repaired: int
    unreadable: int
    duration: float
    mb_per_s: float
    disks: list[DiskCheck]
    problems: list[ExtentProblem]
    notes: list[str] = field(default_factory=list)
    problems_total: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing is left to fix (problems found were all repaired)."""
        return not (self.under_redundant or self.unreadable
                    or any(d.state != health.FAILED for d in self.disks))


@dataclass
class ScrubState:
    """The one row of `scrub_state`."""

    started: float
    position: int = 0
    finished: float | None = None
    repair: int = 0
    elapsed: float = 0.0
    checked: int = 0
    bytes: int = 0
    fragment_bytes: int = 0
    healthy: int = 0
    under_redundant: int = 0
    repaired: int = 0
    unreadable: int = 0


_STATE_COLUMNS = ("started", "position", "finished", "repair", "elapsed", "checked", "bytes",
                  "fragment_bytes", "healthy", "under_redundant", "repaired", "unreadable")


# -- the state row --------------------------------------------------------------------
def load_state(pool: Pool) -> ScrubState | None:
    """The last scrub's state (finished or not), or None if the pool was never scrubbed."""
    with pool.meta.read() as conn:
        row = conn.execute(f"SELECT {', '.join(_STATE_COLUMNS)} FROM scrub_state "
                           "WHERE id = 1").fetchone()
    return None if row is None else ScrubState(*row)


def _save_state(pool: Pool, state: ScrubState) -> None:
    values = [getattr(state, c) for c in _STATE_COLUMNS]
    with pool.meta.write() as conn:
        conn.execute(f"INSERT OR REPLACE INTO scrub_state (id, {', '.join(_STATE_COLUMNS)}) "
                     f"VALUES (1, {', '.join('?' * len(values))})", values)


# -- disks --------------------------------------------------------------------------------
def check_disks(pool: Pool) -> list[DiskCheck]:
    """Disks whose fragments cannot count: failed, missing, unlabelled or mislabelled."""
    out = []
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        problem = ""
        backend = pool.backends[disk.id]
        if disk.state == health.FAILED:
            problem = f"disk {disk.id} has failed"
        elif not backend.root.is_dir():
            problem = f"disk {disk.id} ({disk.path}) is missing"
        else:
            try:
                label = read_label(backend.root)
            except LabelError as exc:
                problem = f"disk {disk.id} ({disk.path}) label: {exc}"
            else:
                if label.pool_uuid != pool.config.uuid or label.disk_uuid != disk.uuid:
                    problem = (f"disk {disk.id} ({disk.path}) carries the label of another "
                               "pool or disk")
        if problem:
            out.append(DiskCheck(disk.id, disk.path, disk.state, problem))
    return out


def repair_blockers(pool: Pool, disks: list[DiskCheck] | None = None) -> list[DiskCheck]:
    """Disks that would receive rebuilt fragments (healthy) but are missing or mislabelled.

    Rebuilding while such a disk is healthy would put new fragments where the pool's
    disk is not (an unmounted mount point, say): repairs wait until it is back or failed.
    """
    checks = check_disks(pool) if disks is None else disks
    return [d for d in checks if d.id in pool.disks and pool.disks[d.id].writable]


def blocker_note(blockers: list[DiskCheck]) -> str:
    names = "; ".join(d.problem for d in blockers)
    return (f"repairs skipped: {names}. Bring the disk back, or mark it failed with "
            "'dynamicfs fail-disk', then repair again")


# -- one extent ---------------------------------------------------------------------------
def check_extent(pool: Pool, info: ExtentInfo, bad_disks: dict[int, str]) -> ExtentCheck:
    """Read and check every fragment of one extent; never raises for bad data."""
    policy = info.policy
    problems: list[str] = []
    good: dict[int, Payload] = {}
    fragment_bytes = 0
    disks_seen: set[int] = set()
    indexes_seen: set[int] = set()
    for row in info.fragments:
        where = f"fragment {row.index} on disk {row.disk_id}"
        if row.index >= policy.width:
            problems.append(f"{where}: index beyond the {policy} width")
            continue
        if row.disk_id in disks_seen:
            problems.append(f"{where}: a second fragment of the extent on that disk")
            continue
        disks_seen.add(row.disk_id)
        indexes_seen.add(row.index)
        if row.disk_id not in pool.disks:
            problems.append(f"{where}: the disk is not in the pool")
            continue
        if row.disk_id in bad_disks:
            problems.append(f"{where}: {bad_disks[row.disk_id]}")
            continue
        payload, size, problem = pool.store.read_fragment(row)
        fragment_bytes += size
        if payload is not None and policy.kind == "replicate" and (
                row.checksum != info.checksum or len(payload) != info.length):
            # A replica is the extent itself: its checked BLAKE3 must be the extent's.
            payload, problem = None, "corrupt (replica differs from the extent checksum)"
        if payload is None:
            problems.append(f"{where}: {problem}")
        elif row.index in good:
            problems.append(f"{where}: a second fragment with that index")
        else:
            good[row.index] = payload
    absent = [i for i in range(policy.width) if i not in indexes_seen]
    if absent:
        problems.append(f"{policy.width - len(absent)} of {policy.width} fragments stored "
                        f"(index {', '.join(map(str, absent))} never written or dropped)")
    ids = frozenset(r.id for r in info.fragments)
    if len(good) < policy.k:
        return ExtentCheck(info.id, info.length, fragment_bytes, UNREADABLE,
                           [f"{len(good)} of {policy.k} needed fragments good", *problems], ids)
    problem = _check_decodes(info, good)
    if problem:
        return ExtentCheck(info.id, info.length, fragment_bytes, UNREADABLE,
                           [problem, *problems], ids)
    state = UNDER_REDUNDANT if problems else HEALTHY
    if problems:
        problems.insert(0, f"{len(good)} of {policy.width} fragments good")
    return ExtentCheck(info.id, info.length, fragment_bytes, state, problems, ids)


def _check_decodes(info: ExtentInfo, good: dict[int, Payload]) -> str:
    """'' when the good fragments give back the extent's bytes, else what went wrong."""
    if info.policy.kind == "replicate":
        return ""  # each good replica was checked against the extent checksum already
    try:
        data = codecs.decode(info.policy, good, info.length)
    except UnreadableError as exc:
        return str(exc)
    if blake3.blake3(data).digest() != info.checksum:
        return "decoded bytes fail the extent checksum"
    return ""


# -- batches ------------------------------------------------------------------------------
def load_extents(pool: Pool, after: int, limit: int) -> list[ExtentInfo]:
    """Up to `limit` extents with ids above `after`, in id order, with their fragment rows."""
    with pool.meta.read() as conn:
        rows = conn.execute("SELECT id, length, checksum, policy FROM extents WHERE id > ? "
                            "ORDER BY id LIMIT ?", (after, limit)).fetchall()
        if not rows:
            return []
        frags = conn.execute(f"SELECT {FRAGMENT_COLUMNS} FROM fragments "
                             "WHERE extent_id BETWEEN ? AND ? ORDER BY extent_id, idx",
                             (rows[0][0], rows[-1][0])).fetchall()
    by_extent: dict[int, list[FragmentRow]] = collections.defaultdict(list)
    for f in frags:
        by_extent[f[1]].append(FragmentRow(*f))
    return [ExtentInfo(r[0], r[1], bytes(r[2]), parse_concrete(r[3]), by_extent.get(r[0], []))
            for r in rows]


def load_extent(pool: Pool, extent_id: int) -> ExtentInfo | None:
    found = load_extents(pool, extent_id - 1, 1)
    return found[0] if found and found[0].id == extent_id else None


def _checked_batches(pool: Pool, executor: ThreadPoolExecutor, after: int, size: int,
                     bad_disks: dict[int, str]) -> Iterator[tuple[int, list[ExtentCheck]]]:
    """(last extent id, checks) per batch, with AHEAD batches queued behind the current one."""
    queue: collections.deque[tuple[int, list[Future[ExtentCheck]]]] = collections.deque()
    position = after
    exhausted = False
    while True:
        while not exhausted and len(queue) <= AHEAD:
            infos = load_extents(pool, position, size)
            if not infos:
                exhausted = True
                break
            position = infos[-1].id
            queue.append((position, [executor.submit(check_extent, pool, info, bad_disks)
                                     for info in infos]))
        if not queue:
            return
        last, futures = queue.popleft()
        yield last, [f.result() for f in futures]


# -- the scrub ----------------------------------------------------------------------------
def scrub(pool: Pool, *, repair: bool = False, restart: bool = False,
          progress: Progress | None = None, batch: int = BATCH,
          stop_after: int | None = None) -> ScrubReport:
    """Check every extent (continuing an unfinished scrub unless `restart`).

    `stop_after` ends the run after that many extents without finishing the scrub, as an
    interruption would (the next scrub resumes).
    """
    state = load_state(pool)
    resumed = state is not None and state.finished is None and not restart
    if state is None or not resumed:
        state = ScrubState(started=time.time())
        with pool.meta.write() as conn:
            conn.execute("DELETE FROM scrub_problems")
    state.repair = int(repair or bool(state.repair and resumed))
    _save_state(pool, state)
    pool.meta.commit()

    disks = check_disks(pool)
    bad_disks = {d.id: d.problem for d in disks}
    notes = []
    blockers = repair_blockers(pool, disks) if repair else []
    if blockers:
        repair = False
        notes.append(blocker_note(blockers))
    with pool.meta.read() as conn:
        total = conn.execute("SELECT count(*) FROM extents WHERE id > ?",
                             (state.position,)).fetchone()[0]
    readable = sum(1 for d in pool.disks.values() if d.readable)
    workers = max(4, min(MAX_WORKERS, 2 * readable))
    run_start = time.monotonic()
    base_elapsed = state.elapsed
    done = 0
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dynamicfs-scrub")
    try:
        for last, checks in _checked_batches(pool, executor, state.position, batch, bad_disks):
            for check in checks:
                _judge(pool, state, check, repair, bad_disks)
            done += len(checks)
            state.position = last
            state.elapsed = base_elapsed + time.monotonic() - run_start
            _save_state(pool, state)
            pool.meta.commit()
            if progress is not None:
                progress(done, max(total, done), f"{state.fragment_bytes // 2**20} MiB read")
            if stop_after is not None and done >= stop_after:
                break
        else:
            state.finished = time.time()
            state.elapsed = base_elapsed + time.monotonic() - run_start
            _save_state(pool, state)
            pool.meta.commit()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return _report(pool, state, resumed, disks, notes)


def _judge(pool: Pool, state: ScrubState, check: ExtentCheck, repair: bool,
           bad_disks: dict[int, str]) -> None:
    """Count one extent's verdict; repair it or queue it for repair; record problems."""
    if check.state != HEALTHY:
        # The extent may have changed (rewritten, freed or rebuilt) while it was read.
        current = load_extent(pool, check.extent_id)
        if current is None:
            return
        if frozenset(r.id for r in current.fragments) != check.fragment_ids:
            check = check_extent(pool, current, bad_disks)
    state.checked += 1
    state.bytes += check.length
    state.fragment_bytes += check.fragment_bytes
    if check.state == HEALTHY:
        state.healthy += 1
        return
    verdict, detail = check.state, check.detail
    if repair and verdict == UNDER_REDUNDANT:
        verdict, detail = _repair(pool, check)
    if verdict == HEALTHY:
        state.healthy += 1
        return
    if verdict == REPAIRED:
        state.repaired += 1
    elif verdict == UNREADABLE:
        state.unreadable += 1
    else:
        state.under_redundant += 1
    now = time.time()
    with pool.meta.write() as conn:
        conn.execute("INSERT OR REPLACE INTO scrub_problems (extent_id, state, detail, found) "
                     "VALUES (?, ?, ?, ?)", (check.extent_id, verdict, detail, now))
        if verdict != REPAIRED:
            conn.execute("INSERT OR IGNORE INTO repair_queue (extent_id, reason, queued) "
                         "VALUES (?, ?, ?)", (check.extent_id, f"scrub: {detail}"[:500], now))


REBUILD_TRIES = 3


def rebuild(pool: Pool, extent_id: int, *, verify: bool = True, parallel: bool = True) -> str:
    """ExtentStore.rebuild, tried again while it reports 'stale' (the extent changed
    under it, nothing done); 'gone' when the extent was freed meanwhile."""
    outcome = "stale"
    for _ in range(REBUILD_TRIES):
        with pool.meta.read() as conn:  # only whether it exists: rebuild loads it itself
            if conn.execute("SELECT 1 FROM extents WHERE id = ?",
                            (extent_id,)).fetchone() is None:
                return "gone"
        outcome = pool.store.rebuild(extent_id, verify=verify, parallel=parallel)
        if outcome != "stale":
            break
    return outcome


def _repair(pool: Pool, check: ExtentCheck) -> tuple[str, str]:
    try:
        outcome = rebuild(pool, check.extent_id)
    except UnreadableError as exc:
        return UNREADABLE, f"{check.detail}; repair failed: {exc}"
    except (DynamicFSError, OSError) as exc:
        return UNDER_REDUNDANT, f"{check.detail}; repair failed: {exc}"
    if outcome == "repaired":
        return REPAIRED, check.detail
    if outcome in ("healthy", "gone"):
        return HEALTHY, ""
    if outcome == "stale":
        return UNDER_REDUNDANT, f"{check.detail}; the extent kept changing while being repaired"
    return UNDER_REDUNDANT, (f"{check.detail}; repair {outcome}: not enough healthy disks "
                             "with room for every fragment")


def _report(pool: Pool, state: ScrubState, resumed: bool, disks: list[DiskCheck],
            notes: list[str]) -> ScrubReport:
    with pool.meta.read() as conn:
        # Unreadable first: those are the files a user must restore.
        rows = conn.execute("SELECT extent_id, state, detail FROM scrub_problems ORDER BY "
                            "state != 'unreadable', extent_id LIMIT ?",
                            (MAX_LISTED,)).fetchall()
        total = conn.execute("SELECT count(*) FROM scrub_problems").fetchone()[0]
        resolver = PathResolver(conn)
        problems = [ExtentProblem(e, s, d, resolver.paths_of_extent(e)) for e, s, d in rows]
    rate = state.fragment_bytes / state.elapsed / 1e6 if state.elapsed > 0 else 0.0
    return ScrubReport(state.started, state.finished, resumed, bool(state.repair), state.checked,
                       state.bytes, state.fragment_bytes, state.healthy, state.under_redundant,
                       state.repaired, state.unreadable, round(state.elapsed, 3), round(rate, 1),
                       disks, problems, notes, total)
