"""The repair queue: bring extents back to full redundancy, least redundant first.

What needs repair:
- extents the read path found a bad or missing fragment of (ExtentStore.repair_wanted,
  in memory; `persist_repair_wanted` moves them into the `repair_queue` table so they
  survive a restart),
- extents queued in `repair_queue` (by the read path, by scrub, by fsck),
- extents with a fragment on a failed disk or on a disk the pool no longer has,
- extents stored with fewer fragments than their policy (DESIGN invariant 6: a write
  with too few healthy disks records them; repair completes them when disks allow).
  Fragments on a draining disk count as present: moving them is the drain's work.

`rebuild_pending` works through them, the extent with the fewest fragments to spare
first: its thread loads the extents' metadata in batches, REPAIR_WORKERS threads do the
disk work (ExtentStore.prepare_rebuild: read, re-create, write), and its thread records
their results in batches (record_rebuilt), committing every COMMIT_SECONDS (or
COMMIT_EVERY extents, whichever comes first: what a crash can undo stays small). It
runs as a command or in a background thread of the mount daemon (`should_stop` ends it
between two extents). An extent that cannot be completed stays queued.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from sqlite3 import Connection
from typing import TYPE_CHECKING

from dynamicfs.disks import health
from dynamicfs.engine.store import ExtentInfo
from dynamicfs.errors import DynamicFSError, UnreadableError
from dynamicfs.maintenance.parallel import Outcome, rebuild_in_batches
from dynamicfs.maintenance.scrub import blocker_note, rebuild, repair_blockers
from dynamicfs.meta.paths import PathResolver
from dynamicfs.redundancy.policy import parse_concrete

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

    Progress = Callable[[int, int, str], None]

COMMIT_EVERY = 1024
# A commit makes the workers wait for the metadata lock through an fsync: every 64
# extents that cost a fifth of the rebuild time; once a second it costs little.
COMMIT_SECONDS = 1.0
# Extents rebuilt at once. With the metadata work on the calling thread, two kept the
# disks as busy as four did here and spent less time handing the GIL around
# (1,024 ec:4+2 extents: 0.9-1.1 s against 1.1-1.35 s, page cache cold or warm).
REPAIR_WORKERS = 2
# Extents a report lists (with their files); all are counted.
MAX_LISTED = 1000
READ_ERROR = "read found a bad or missing fragment"


@dataclass
class PendingExtent:
    extent_id: int
    margin: int  # fragments that count minus k: how many more losses it survives
    reason: str
    # Queued because something was found bad: read every fragment to find all that are.
    # Otherwise the metadata alone says what is missing (a failed disk, too few fragments).
    verify: bool = True


@dataclass
class RepairItem:
    extent_id: int
    outcome: str  # repaired | partial | stuck | unreadable
    detail: str
    paths: list[str] = field(default_factory=list)


@dataclass
class RepairReport:
    pending: int
    attempted: int
    repaired: int
    already_healthy: int
    partial: int
    stuck: int
    unreadable: int
    remaining: int
    duration: float
    problems: list[RepairItem]
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.remaining == 0


def persist_repair_wanted(pool: Pool) -> int:
    """Move the extents the read path wants repaired into `repair_queue`; how many."""
    store = pool.store
    wanted = set(store.repair_wanted)
    if not wanted:
        return 0
    now = time.time()
    with pool.meta.write() as conn:
        conn.executemany("INSERT OR IGNORE INTO repair_queue (extent_id, reason, queued) "
                         "SELECT id, ?, ? FROM extents WHERE id = ?",
                         [(READ_ERROR, now, e) for e in sorted(wanted)])
    store.repair_wanted.difference_update(wanted)
    return len(wanted)


def counting_disks(pool: Pool) -> list[int]:
    """Disks whose fragments count toward redundancy."""
    return sorted(d.id for d in pool.disks.values() if d.state in health.COUNTS_FOR_REDUNDANCY)


def id_list(ids: list[int]) -> str:
    """'(1, 2, 3)' for an SQL IN clause (ids are ints, so this is safe to inline)."""
    return f"({', '.join(str(int(i)) for i in ids)})"


def under_redundant(conn: Connection, counting: list[int]) -> dict[int, int]:
    """Extent id -> margin (counting fragments - k) for every extent short of its width."""
    out: dict[int, int] = {}
    for (policy_text,) in conn.execute("SELECT DISTINCT policy FROM extents").fetchall():
        policy = parse_concrete(policy_text)
        rows = conn.execute(
            "SELECT e.id, count(f.id) FROM extents e LEFT JOIN fragments f "
            f"ON f.extent_id = e.id AND f.disk_id IN {id_list(counting)} AND f.idx < ? "
            "WHERE e.policy = ? GROUP BY e.id HAVING count(f.id) < ?",
            (policy.width, policy_text, policy.width)).fetchall()
        for extent_id, count in rows:
            out[extent_id] = count - policy.k
    return out


def pending_repairs(pool: Pool) -> list[PendingExtent]:
    """Everything that needs repair, fewest fragments to spare first."""
    persist_repair_wanted(pool)
    # Fragments on draining disks are intact and readable: moving them is the drain's
    # work, so here they count as present.
    counting = sorted({*counting_disks(pool), *(d.id for d in pool.disks.values()
                                                 if d.state == health.DRAINING)})
    failed = sorted(d.id for d in pool.disks.values() if d.state == health.FAILED)
    with pool.meta.read() as conn:
        short = under_redundant(conn, counting)
        reasons: dict[int, str] = {}
        for extent_id, reason in conn.execute("SELECT extent_id, reason FROM repair_queue"):
            reasons[extent_id] = reason
        queued = set(reasons)
        for (extent_id,) in conn.execute(
                "SELECT DISTINCT extent_id FROM fragments "
                f"WHERE disk_id IN {id_list(failed)} OR disk_id NOT IN "
                f"{id_list(list(pool.disks))}"):
            reasons.setdefault(extent_id, "fragment on a failed or removed disk")
        for extent_id in short:
            reasons.setdefault(extent_id, "fewer fragments than its policy")
        margins = dict(short)
        unknown = [e for e in reasons if e not in margins]
        for extent_id in unknown:
            row = conn.execute("SELECT policy FROM extents WHERE id = ?", (extent_id,)).fetchone()
            if row is None:  # freed since it was queued
                margins[extent_id] = 1 << 30
                continue
            count = conn.execute(f"SELECT count(*) FROM fragments WHERE extent_id = ? AND "
                                 f"disk_id IN {id_list(counting)}", (extent_id,)).fetchone()[0]
            margins[extent_id] = count - parse_concrete(row[0]).k
    items = [PendingExtent(e, margins[e], reasons[e], e in queued) for e in reasons]
    items.sort(key=lambda p: (p.margin, p.extent_id))
    return items


def rebuild_pending(pool: Pool, progress: Progress | None = None, limit: int | None = None,
                    *, commit_every: int = COMMIT_EVERY,
                    should_stop: Callable[[], bool] | None = None) -> RepairReport:
    """Repair queued and under-redundant extents (at most `limit`), least redundant first,
    REPAIR_WORKERS at a time (parallel.rebuild_in_batches)."""
    start = time.monotonic()
    items = pending_repairs(pool)
    todo = items if limit is None else items[:limit]
    notes = []
    blockers = repair_blockers(pool)
    if blockers:
        notes.append(blocker_note(blockers))
        todo = []
    counts = {"repaired": 0, "healthy": 0, "partial": 0, "stuck": 0, "unreadable": 0}
    problems: list[RepairItem] = []
    attempted = 0
    since, committed = 0, time.monotonic()

    def go_on(_: PendingExtent) -> bool:
        return should_stop is None or not should_stop()

    def tally(done: list[tuple[PendingExtent, tuple[str, str]]]) -> None:
        nonlocal attempted, since, committed
        for item, (outcome, detail) in done:
            if progress is not None:
                progress(attempted, len(todo), f"extent {item.extent_id}")
            attempted += 1
            counts[outcome] += 1
            if outcome not in ("repaired", "healthy") and len(problems) < MAX_LISTED:
                problems.append(RepairItem(item.extent_id, outcome, detail))
            since += 1
        if since >= commit_every or time.monotonic() - committed >= COMMIT_SECONDS:
            pool.meta.commit()
            since, committed = 0, time.monotonic()

    for done in rebuild_in_batches(
            pool, itertools.takewhile(go_on, todo), lambda item: item.extent_id,
            lambda item, info: pool.store.prepare_rebuild(info, verify=item.verify,
                                                          parallel=False),
            _settle, threads=REPAIR_WORKERS, name="dynamicfs-repair"):
        tally(_retry_stale(pool, done))
    pool.meta.commit()
    if progress is not None:
        progress(attempted, len(todo), "")
    with pool.meta.read() as conn:
        resolver = PathResolver(conn)
        for p in problems:
            p.paths = resolver.paths_of_extent(p.extent_id)
    remaining = len(items) - counts["repaired"] - counts["healthy"]
    return RepairReport(len(items), attempted, counts["repaired"], counts["healthy"],
                        counts["partial"], counts["stuck"], counts["unreadable"], remaining,
                        round(time.monotonic() - start, 3), problems, notes)


def _retry_stale(pool: Pool, done: list[tuple[PendingExtent, tuple[str, str] | None]]
                 ) -> list[tuple[PendingExtent, tuple[str, str]]]:
    """The settled batch, with each extent that changed while it was rebuilt (settled
    as None) tried again on its own (ExtentStore.rebuild, a few times)."""
    out: list[tuple[PendingExtent, tuple[str, str]]] = []
    for item, settled in done:
        if settled is None:
            result: Outcome
            try:
                result = rebuild(pool, item.extent_id, verify=item.verify, parallel=False)
            except (DynamicFSError, OSError) as exc:
                result = exc
            with pool.meta.write() as conn:
                settled = _settle(conn, item, None, result, retried=True)
            assert settled is not None
        out.append((item, settled))
    return out


def _settle(conn: Connection, item: PendingExtent, info: ExtentInfo | None, result: Outcome,
            *, retried: bool = False) -> tuple[str, str] | None:
    """(outcome, detail) of a rebuild's result, what is not fixed staying queued with
    why; None for an extent that changed meanwhile, to be tried again."""
    if result == "stale" and not retried:
        return None
    if isinstance(result, UnreadableError):
        return _requeue(conn, item, f"unreadable: {result}", "unreadable", str(result))
    if isinstance(result, (DynamicFSError, OSError)):
        return _requeue(conn, item, f"{item.reason}; repair failed: {result}", "stuck",
                        str(result))
    if result == "repaired":
        return "repaired", ""
    if result in ("healthy", "gone"):
        conn.execute("DELETE FROM repair_queue WHERE extent_id = ?", (item.extent_id,))
        return "healthy", ""
    if result == "stale":
        detail = "the extent kept changing while being rebuilt; it stays queued"
        return _requeue(conn, item, f"{item.reason}; {detail}", "stuck", detail)
    detail = "not enough healthy disks with room for every fragment"
    return _requeue(conn, item, f"{item.reason}; {detail}",
                    "partial" if result == "partial" else "stuck", detail)


def _requeue(conn: Connection, item: PendingExtent, reason: str, outcome: str,
             detail: str) -> tuple[str, str]:
    conn.execute("INSERT OR REPLACE INTO repair_queue (extent_id, reason, queued) "
                 "VALUES (?, ?, ?)", (item.extent_id, reason[:500], time.time()))
    return outcome, detail
