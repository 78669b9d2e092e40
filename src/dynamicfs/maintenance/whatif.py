"""What if disks failed: which files would become unreadable, which would lose redundancy.

Answers from the metadata alone (where fragments are and which disks count), without
reading data: a fragment that is already rotten but not yet found by a scrub is
counted as good. Also `failures_survivable(pool)`: how many arbitrary disk failures
every extent survives now, for `status`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynamicfs.errors import DiskError
from dynamicfs.maintenance.repair import counting_disks, id_list
from dynamicfs.meta.paths import PathResolver
from dynamicfs.redundancy.policy import parse_concrete

if TYPE_CHECKING:
    from sqlite3 import Connection

    from dynamicfs.engine.pool import Pool


@dataclass
class FileImpact:
    path: str
    extents: int  # extents of the file touched by the failure
    margin: int  # failures the worst of them would still survive (-1: unreadable)


@dataclass
class WhatIfReport:
    disks: list[dict[str, object]]
    extents_affected: int
    extents_unreadable: int
    extents_less_redundant: int
    unreadable: list[FileImpact] = field(default_factory=list)
    less_redundant: list[FileImpact] = field(default_factory=list)
    already_unreadable: list[FileImpact] = field(default_factory=list)
    survivable_now: int = 0
    survivable_after: int = 0

    @property
    def loses_data(self) -> bool:
        return bool(self.unreadable)


def _resolve(pool: Pool, refs: list[str]) -> list[int]:
    ids = []
    for ref in refs:
        disk = pool.disk_by_ref(ref)
        if disk is None:
            known = ", ".join(f"{d.id} ({d.path})" for d in pool.disks.values()) or "none"
            raise DiskError(f"unknown disk {ref!r}; disks of this pool: {known}")
        ids.append(disk.id)
    if not ids:
        raise DiskError("name at least one disk to fail (id, UUID or path)")
    return sorted(set(ids))


def what_if(pool: Pool, fail: list[str]) -> WhatIfReport:
    """The files at stake if the disks in `fail` (ids, UUIDs or paths) failed now."""
    targets = _resolve(pool, fail)
    readable = {d.id for d in pool.disks.values() if d.readable}
    counting = set(counting_disks(pool))
    per_extent: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    policies: dict[int, str] = {}
    with pool.meta.read() as conn:
        rows = conn.execute(
            "SELECT f.extent_id, f.idx, f.disk_id, e.policy FROM fragments f "
            "JOIN extents e ON e.id = f.extent_id WHERE f.extent_id IN "
            f"(SELECT extent_id FROM fragments WHERE disk_id IN {id_list(targets)})").fetchall()
        for extent_id, idx, disk_id, policy in rows:
            per_extent[extent_id].append((idx, disk_id))
            policies[extent_id] = policy
        dead: dict[int, int] = {}  # extent -> margin after (-1: unreadable)
        already: set[int] = set()
        lost = set(targets)
        for extent_id, frags in per_extent.items():
            policy = parse_concrete(policies[extent_id])
            before = {i for i, d in frags if d in readable and i < policy.width}
            after = {i for i, d in frags if d in readable and d not in lost and i < policy.width}
            if len(before) < policy.k:
                already.add(extent_id)
                continue
            count_before = {i for i, d in frags if d in counting and i < policy.width}
            count_after = {i for i, d in frags
                           if d in counting and d not in lost and i < policy.width}
            if len(after) < policy.k:
                dead[extent_id] = -1
            elif len(count_after) < len(count_before):
                dead[extent_id] = len(count_after) - policy.k
        resolver = PathResolver(conn)
        unreadable = _files(resolver, {e: m for e, m in dead.items() if m < 0})
        less = _files(resolver, {e: m for e, m in dead.items() if m >= 0})
        already_files = _files(resolver, {e: -1 for e in already})
    unreadable_paths = {f.path for f in unreadable} | {f.path for f in already_files}
    less = [f for f in less if f.path not in unreadable_paths]
    now = failures_survivable(pool)
    return WhatIfReport(
        disks=[{"id": i, "path": pool.disks[i].path, "state": pool.disks[i].state}
               for i in targets],
        extents_affected=len(per_extent),
        extents_unreadable=sum(1 for m in dead.values() if m < 0),
        extents_less_redundant=sum(1 for m in dead.values() if m >= 0),
        unreadable=unreadable, less_redundant=less, already_unreadable=already_files,
        survivable_now=now,
        survivable_after=failures_survivable(pool, also_failed=frozenset(targets)),
    )


def _files(resolver: PathResolver, margins: dict[int, int]) -> list[FileImpact]:
    """Group extents by the files that use them: per path, extents and the worst margin."""
    by_path: dict[str, list[int]] = {}
    for extent_id in sorted(margins):
        for path in resolver.paths_of_extent(extent_id):
            by_path.setdefault(path, []).append(margins[extent_id])
    return [FileImpact(p, len(m), min(m)) for p, m in sorted(by_path.items())]


def known_unreadable(conn: Connection) -> int:
    """Extents still in the pool that the last scrub or a repair found unreadable."""
    return int(conn.execute(
        "SELECT count(*) FROM extents e WHERE e.id IN (SELECT extent_id FROM scrub_problems "
        "WHERE state = 'unreadable') OR e.id IN (SELECT extent_id FROM repair_queue "
        "WHERE reason LIKE 'unreadable:%')").fetchone()[0])


def failures_survivable(pool: Pool, also_failed: frozenset[int] = frozenset()) -> int:
    """How many arbitrary disk failures every extent survives now.

    The minimum over extents of (fragments that count toward redundancy - k), from the
    metadata, and 0 when some extent is already at or below k or is known to be
    unreadable (found so by the last scrub or by repair). With no extents at all, every
    disk that counts may fail without losing data: returns the number of those disks.
    """
    counting = [d for d in counting_disks(pool) if d not in also_failed]
    with pool.meta.read() as conn:
        if known_unreadable(conn):
            return 0
        rows = conn.execute(
            "SELECT policy, min(n) FROM (SELECT e.policy AS policy, count(f.id) AS n "
            "FROM extents e LEFT JOIN fragments f ON f.extent_id = e.id "
            f"AND f.disk_id IN {id_list(counting)} GROUP BY e.id) GROUP BY policy").fetchall()
    if not rows:
        return len(counting)
    return max(0, min(n - parse_concrete(policy).k for policy, n in rows))

