"""Draining a disk: moving every fragment it holds to other disks, then letting it go.

`plan_drain` decides, without changing anything, whether the disks that stay can hold
every extent the disk holds part of: each extent must keep at least its policy's
minimum of fragments (DESIGN invariant 6) on distinct disks (invariant 1) with room
for them, and must still be readable. `drain_disk` then marks the disk draining (no new
fragments go there; it is still read from), re-creates its fragments through
`ExtentStore.prepare_rebuild(evacuate=...)`, DRAIN_WORKERS extents at a time
(parallel.rebuild_in_batches; a rebuild that finds its extent changed by the namespace
meanwhile is void and tried again), commits every DRAIN_COMMIT_EXTENTS extents or
DRAIN_COMMIT_BYTES bytes so an interrupted drain resumes where it stopped, and finally
deletes the disk's row and its label.

Invariant 7 is kept by the caller: a drain that would leave an extent below its
minimum runs only when forced; the extents at stake are named in the plan and in
the result. Nothing here prints or knows about file paths.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from sqlite3 import Connection
from typing import TYPE_CHECKING

from dynamicfs.disks import health
from dynamicfs.disks.label import LABEL_NAME
from dynamicfs.engine.store import ExtentInfo, RebuiltExtent
from dynamicfs.maintenance.metacopy import METADATA_DIR
from dynamicfs.maintenance.parallel import Outcome, rebuild_in_batches
from dynamicfs.placement.placement import Candidate, choose_disks
from dynamicfs.redundancy.policy import Policy, parse_concrete

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

# progress(done, total, message), as admin operations report it.
Progress = Callable[[int, int, str], None]

DRAIN_COMMIT_EXTENTS = 64
DRAIN_COMMIT_BYTES = 256 * 1024 * 1024
# Extents rebuilt at once: one's reads and hashing overlap another's writes.
DRAIN_WORKERS = 4
REPAIR_REASON = "under-redundant after disk {disk} left the pool"
# What became of one extent (_moved).
MOVED, GONE, STUCK, STALE = "moved", "gone", "stuck", "stale"



@dataclass
class DrainPlan:
    """What draining a disk would do. Extent ids, never paths."""

    disk_id: int
    extents: int = 0
    bytes: int = 0
    # Would end with fewer fragments than the policy's width (still >= minimum).
    under_redundant: list[int] = field(default_factory=list)
    # Data at stake: would end below the policy's minimum because too few disks
    # remain, or because the disks that remain lack free space; or cannot be read now.
    too_few_disks: list[int] = field(default_factory=list)
    no_space: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)

    @property
    def at_stake(self) -> list[int]:
        return sorted(self.too_few_disks + self.no_space + self.unreadable)

    @property
    def safe(self) -> bool:
        return not (self.too_few_disks or self.no_space or self.unreadable)


@dataclass
class DrainResult:
    disk_id: int
    path: str
    extents: int = 0           # extents that had a fragment on the disk
    moved: int = 0             # fragments re-created elsewhere
    bytes_moved: int = 0       # bytes of those fragments (headers included)
    under_redundant: list[int] = field(default_factory=list)
    below_minimum: list[int] = field(default_factory=list)  # forced below the minimum
    stuck: list[int] = field(default_factory=list)     # kept the disk in the pool
    removed: bool = False
    label_removed: bool = False


@dataclass
class _Fragment:
    index: int
    disk_id: int
    size: int


@dataclass
class _Extent:
    id: int
    policy: Policy
    fragments: list[_Fragment] = field(default_factory=list)


def _extents_on(conn: Connection, disk_id: int) -> list[_Extent]:
    """Every extent with a fragment on the disk, with all of its fragments."""
    rows = conn.execute(
        "SELECT e.id, e.policy, f.idx, f.disk_id, f.size FROM extents e "
        "JOIN fragments f ON f.extent_id = e.id "
        "WHERE e.id IN (SELECT extent_id FROM fragments WHERE disk_id = ?) "
        "ORDER BY e.id, f.idx", (disk_id,)).fetchall()
    extents: dict[int, _Extent] = {}
    policies: dict[str, Policy] = {}
    for extent_id, policy_text, index, on_disk, size in rows:
        extent = extents.get(extent_id)
        if extent is None:
            policy = policies.get(policy_text)
            if policy is None:
                policy = policies[policy_text] = parse_concrete(policy_text)
            extent = extents[extent_id] = _Extent(extent_id, policy)
        extent.fragments.append(_Fragment(index, on_disk, size))
    return list(extents.values())


def plan_drain(pool: Pool, disk_id: int) -> DrainPlan:
    """Simulate the drain: where would each extent's fragments go? Changes nothing.

    Placement is simulated greedily the way ExtentStore places rebuilt fragments
    (most free space first, distinct disks), charging each choice against the free
    space of the disks that stay.
    """
    disks = pool.disks
    candidates = [Candidate(d.id, pool.store.disk_free(d.id), d.tier)
                  for d in pool.healthy_disks() if d.id != disk_id]
    plan = DrainPlan(disk_id)
    with pool.meta.read() as conn:
        extents = _extents_on(conn, disk_id)
    for extent in extents:
        plan.extents += 1
        plan.bytes += sum(f.size for f in extent.fragments if f.disk_id == disk_id)
        policy = extent.policy
        readable = {f.index for f in extent.fragments
                    if f.disk_id in disks and disks[f.disk_id].readable}
        kept: dict[int, int] = {}
        for f in extent.fragments:
            state = disks[f.disk_id].state if f.disk_id in disks else None
            if f.disk_id != disk_id and state in health.COUNTS_FOR_REDUNDANCY:
                kept.setdefault(f.index, f.disk_id)
        size = max(f.size for f in extent.fragments)
        used = set(kept.values())
        placed = 0
        for _ in range(policy.width - len(kept)):
            chosen = choose_disks(candidates, 1, size, exclude=used)
            if not chosen:
                break
            used.add(chosen[0])
            placed += 1
            for c in candidates:
                if c.disk_id == chosen[0]:
                    c.free -= size
        final = len(kept) + placed
        if len(readable) < policy.k:
            plan.unreadable.append(extent.id)
        elif final < policy.minimum:
            reachable = len(kept) + sum(1 for c in candidates if c.disk_id not in kept.values())
            if reachable < policy.minimum:
                plan.too_few_disks.append(extent.id)
            else:
                plan.no_space.append(extent.id)
        elif final < policy.width:
            plan.under_redundant.append(extent.id)
    return plan


def drain_disk(pool: Pool, disk_id: int, *, force: bool = False,
               progress: Progress | None = None) -> DrainResult:
    """Move every fragment off the disk, then remove the disk from the pool.

    Without `force`, an extent that would be left below its policy's minimum keeps its
    fragment on the disk and the disk stays in the pool, draining (`stuck`); with
    `force` such extents lose that fragment (`below_minimum`). Extents left with at
    least their minimum but fewer than their width go to the repair queue
    (`under_redundant`).
    """
    disk = pool.disks[disk_id]
    result = DrainResult(disk_id, disk.path)
    # A readable disk stops taking fragments but is still read from; a failed one
    # stays failed (it takes none either, and nothing can be read from it).
    if disk.readable and disk.state != health.DRAINING:
        _set_state(pool, disk_id, health.DRAINING, "being removed")
    with pool.meta.read() as conn:
        total = conn.execute("SELECT count(DISTINCT extent_id) FROM fragments WHERE disk_id = ?",
                             (disk_id,)).fetchone()[0]
    done = 0
    unmovable: set[int] = set()
    since_commit = (0, 0)
    if progress is not None:
        progress(0, total, "")
    # Passes repeat until a pass finds nothing new: a write that chose its disks just
    # before the disk became draining may still land there, and an extent whose rebuild
    # was void (the namespace changed it meanwhile) is tried again. The last check and
    # the removal run under the metadata lock, so no such write can be recorded between.
    evacuate = frozenset({disk_id})

    def prepare(_: int, info: ExtentInfo) -> RebuiltExtent | str:
        if not any(r.disk_id == disk_id for r in info.fragments):
            return GONE  # moved off meanwhile: nothing to do
        return pool.store.prepare_rebuild(info, evacuate=evacuate, verify=False,
                                          parallel=False)

    def settle(conn: Connection, _: int, info: ExtentInfo | None,
               outcome: Outcome) -> tuple[str, int, int]:
        return _moved(conn, info, outcome, disk_id)

    while True:
        pending = _pending(pool, disk_id, unmovable)
        if not pending:
            with pool.meta.lock:
                if _pending(pool, disk_id, unmovable):
                    continue
                result.extents = done
                pool.meta.commit()
                _settle_leftovers(pool, disk_id, force, result)
                if not result.stuck:
                    _forget_disk(pool, disk_id, result)
                pool.meta.commit()
            return result
        for batch in rebuild_in_batches(pool, pending, lambda e: e, prepare, settle,
                                        threads=DRAIN_WORKERS, name="dynamicfs-drain"):
            for extent_id, (outcome, moved, nbytes) in batch:
                if outcome == STALE:
                    continue
                if outcome == STUCK:
                    unmovable.add(extent_id)
                result.moved += moved
                result.bytes_moved += nbytes
                done += 1
                total = max(total, done)
                since_commit = (since_commit[0] + 1, since_commit[1] + nbytes)
                if progress is not None:
                    progress(done, total, f"extent {extent_id}")
            if since_commit[0] >= DRAIN_COMMIT_EXTENTS or since_commit[1] >= DRAIN_COMMIT_BYTES:
                pool.meta.commit()
                since_commit = (0, 0)


def _pending(pool: Pool, disk_id: int, skip: set[int]) -> list[int]:
    """Extents that still have a fragment on the disk, minus those known to be stuck."""
    with pool.meta.read() as conn:
        rows = conn.execute("SELECT DISTINCT extent_id FROM fragments WHERE disk_id = ? "
                            "ORDER BY extent_id", (disk_id,)).fetchall()
    return [row[0] for row in rows if row[0] not in skip]


def _moved(conn: Connection, info: ExtentInfo | None, outcome: Outcome,
           disk_id: int) -> tuple[str, int, int]:
    """What became of an extent rebuilt away from the disk, once recorded: (outcome,
    fragments moved, bytes moved).

    Outcomes: moved; gone (freed meanwhile, its rows went with it, or nothing of it
    was left on the disk); stuck (a fragment stays on the disk: no room elsewhere, or
    the extent cannot be read); stale (the extent changed while it was rebuilt,
    nothing was done: try again).
    """
    before = [r for r in info.fragments if r.disk_id == disk_id] if info is not None else []
    if info is None or not before or outcome == GONE:
        return GONE, 0, 0
    if outcome == STALE:
        return STALE, 0, 0
    if not isinstance(outcome, str):  # an error: the extent stays where it is
        exists = conn.execute("SELECT 1 FROM extents WHERE id = ?", (info.id,)).fetchone()
        return (STUCK if exists else GONE), 0, 0
    left = conn.execute("SELECT count(*) FROM fragments WHERE extent_id = ? AND disk_id = ?",
                        (info.id, disk_id)).fetchone()[0]
    if left:
        return STUCK, 0, 0
    return MOVED, len(before), sum(r.size for r in before)


def _settle_leftovers(pool: Pool, disk_id: int, force: bool, result: DrainResult) -> None:
    """Decide the fate of extents that still have a fragment on the disk."""
    disks = pool.disks
    with pool.meta.read() as conn:
        extents = _extents_on(conn, disk_id)
    below: list[int] = []
    for extent in extents:
        others = {f.index for f in extent.fragments if f.disk_id != disk_id and f.disk_id in disks
                  and disks[f.disk_id].state in health.COUNTS_FOR_REDUNDANCY}
        if len(others) >= extent.policy.minimum:
            result.under_redundant.append(extent.id)
        else:
            below.append(extent.id)
    if below and not force:
        # Nothing is given up: the disk stays in the pool, draining, holding these.
        result.stuck = below
        result.under_redundant = []
        return
    result.below_minimum = below
    drop = result.under_redundant + below
    if not drop:
        return
    reason = REPAIR_REASON.format(disk=disk_id)
    now = time.time()
    with pool.meta.write() as conn:
        conn.executemany("DELETE FROM fragments WHERE extent_id = ? AND disk_id = ?",
                         [(e, disk_id) for e in drop])
        conn.executemany("INSERT OR REPLACE INTO repair_queue (extent_id, reason, queued) "
                         "VALUES (?, ?, ?)", [(e, reason, now) for e in drop])
    for extent_id in drop:
        pool.store.cache.drop(extent_id)


def _set_state(pool: Pool, disk_id: int, state: str, reason: str) -> None:
    old = pool.disks[disk_id].state
    with pool.meta.write() as conn:
        conn.execute("UPDATE disks SET state = ?, reason = ? WHERE id = ?",
                     (state, reason, disk_id))
    pool.record_event("disk-health", {"disk": disk_id, "from": old, "to": state,
                                      "reason": reason})
    pool.meta.commit()
    pool.reload_disks()


def _forget_disk(pool: Pool, disk_id: int, result: DrainResult) -> None:
    """Delete the disk's row, then (once that is durable) its files and its label."""
    backend = pool.backends.get(disk_id)
    with pool.meta.write() as conn:
        conn.execute("DELETE FROM fragments WHERE disk_id = ?", (disk_id,))
        conn.execute("DELETE FROM disks WHERE id = ?", (disk_id,))
    pool.record_event("remove-disk", {"disk": disk_id, "path": result.path,
                                      "moved": result.moved,
                                      "under_redundant": len(result.under_redundant),
                                      "below_minimum": len(result.below_minimum)})
    pool.meta.commit()
    pool.reload_disks()
    result.removed = True
    if backend is not None:
        backend.close()
        result.label_removed = _wipe(backend.root, [backend.segment_root, backend.legacy_root])


def _remove_ours(where: str | os.PathLike[str]) -> None:
    """Remove a segment directory or a directory of fragment fan-out directories, and
    in them only the files DynamicFS writes there."""
    for entry in os.scandir(where):
        if entry.is_dir(follow_symlinks=False):
            _remove_ours(entry.path)
        elif entry.name.endswith((".seg", ".frag")):
            os.unlink(entry.path)
    os.rmdir(where)


def _wipe(root: os.PathLike[str], fragment_dirs: list[os.PathLike[str]]) -> bool:
    """Remove what DynamicFS left in a directory that is no longer a disk of the pool.

    Every segment and fragment file there is garbage now: no metadata names the disk any
    more, and metadata copies there describe a pool the disk has left. Returns whether
    the label is gone (False when the directory cannot be reached).
    """
    shutil.rmtree(os.path.join(root, METADATA_DIR), ignore_errors=True)
    for where in fragment_dirs:
        try:
            _remove_ours(where)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a foreign file, or an unreachable disk: leave the rest as it is
    try:
        os.unlink(os.path.join(root, LABEL_NAME))
    except FileNotFoundError:
        return os.path.isdir(root)
    except OSError:
        return False
    return True
