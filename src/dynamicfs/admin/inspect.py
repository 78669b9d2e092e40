"""Inspection: status, list-extents, show-redundancy, and naming files by their paths.

Nothing here changes the pool. An extent's state is one of:
- healthy: as many fragments that count (on disks whose state counts for redundancy)
  as its policy's width;
- under-redundant: fewer that count, but at least k readable ones;
- unreadable: fewer than k fragments on readable disks.

Paths are paths inside the pool's namespace ('/dir/file'): `resolve_path` walks
directory entries down from the root inode; meta.paths names inodes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from sqlite3 import Connection

from dynamicfs.admin.registry import operation
from dynamicfs.disks import health
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.maintenance.rebuilder import RebuildState, read_state
from dynamicfs.maintenance.whatif import failures_survivable
from dynamicfs.meta.paths import PathResolver
from dynamicfs.meta.schema import LOST_EXTENT
from dynamicfs.namespace.types import ROOT_INO
from dynamicfs.placement.placement import usable_capacity
from dynamicfs.redundancy.policy import AUTO, Policy, describe_auto, ec, parse_concrete, replicate

HEALTHY = "healthy"
UNDER_REDUNDANT = "under-redundant"
UNREADABLE = "unreadable"
# The layouts whose usable capacity `status` reports.
CAPACITY_POLICIES = (replicate(3), ec(4, 2))
MAX_PATHS = 1000


class PathError(DynamicFSError):
    """A path inside the pool does not name what the command needs."""


# -- paths ---------------------------------------------------------------------------
def resolve_path(conn: Connection, path: str) -> int:
    """The inode a path inside the pool names ('/' is the root)."""
    ino = ROOT_INO
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            row = conn.execute("SELECT parent FROM dentries WHERE ino = ? LIMIT 1",
                               (ino,)).fetchone()
            ino = ROOT_INO if ino == ROOT_INO or row is None else int(row[0])
            continue
        row = conn.execute("SELECT ino FROM dentries WHERE parent = ? AND name = ?",
                           (ino, os.fsencode(part))).fetchone()
        if row is None:
            raise PathError(f"no file {path!r} in the pool; give a path inside the pool, "
                            "e.g. /dir/file (see 'dynamicfs list-extents' for all files)")
        ino = int(row[0])
    return ino


def files_of_extents(conn: Connection, extent_ids: Iterable[int]) -> list[str]:
    """Sorted paths of every file that refers to one of these extents."""
    ids = sorted(set(extent_ids))
    inos: set[int] = set()
    for start in range(0, len(ids), 500):
        batch = ids[start: start + 500]
        marks = ",".join("?" * len(batch))
        inos.update(row[0] for row in conn.execute(
            f"SELECT DISTINCT ino FROM file_extents WHERE extent_id IN ({marks})", batch))
    namer = PathResolver(conn)
    return sorted({p for ino in inos for p in namer.paths(ino)})


def _file_ino(conn: Connection, path: str) -> int:
    ino = resolve_path(conn, path)
    row = conn.execute("SELECT mode FROM inodes WHERE ino = ?", (ino,)).fetchone()
    if row is None or not stat.S_ISREG(row[0]):
        raise PathError(f"{path!r} is not a regular file; give the path of a file in the pool")
    return ino


# -- extent states ---------------------------------------------------------------------
def _states_sql(states: Iterable[str]) -> str:
    return ",".join(f"'{s}'" for s in sorted(states))


_EXTENT_HEALTH = f"""
SELECT e.id, e.policy, e.length,
       count(DISTINCT CASE WHEN d.state IN ({_states_sql(health.COUNTS_FOR_REDUNDANCY)})
                           THEN f.idx END),
       count(DISTINCT CASE WHEN d.state IN ({_states_sql(health.READABLE)}) THEN f.idx END),
       coalesce(sum(f.size), 0)
FROM extents e
LEFT JOIN fragments f ON f.extent_id = e.id
LEFT JOIN disks d ON d.id = f.disk_id
"""


@dataclass
class ExtentHealth:
    id: int
    policy: Policy
    length: int
    counting: int   # distinct fragment indexes on disks that count for redundancy
    readable: int   # distinct fragment indexes on readable disks
    raw: int        # bytes of all its fragments

    @property
    def state(self) -> str:
        if self.readable < self.policy.k:
            return UNREADABLE
        if self.counting < self.policy.width:
            return UNDER_REDUNDANT
        return HEALTHY


def extent_health(conn: Connection, extent_ids: list[int] | None = None) -> list[ExtentHealth]:
    """The health of every extent, or of the given ones."""
    policies: dict[str, Policy] = {}

    def policy(text: str) -> Policy:
        if text not in policies:
            policies[text] = parse_concrete(text)
        return policies[text]

    if extent_ids is None:
        rows = conn.execute(_EXTENT_HEALTH + " GROUP BY e.id ORDER BY e.id").fetchall()
    else:
        rows = []
        ids = sorted(set(extent_ids))
        for start in range(0, len(ids), 500):
            batch = ids[start: start + 500]
            marks = ",".join("?" * len(batch))
            rows += conn.execute(_EXTENT_HEALTH + f" WHERE e.id IN ({marks}) GROUP BY e.id "
                                 "ORDER BY e.id", batch).fetchall()
    return [ExtentHealth(r[0], policy(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


# -- status ------------------------------------------------------------------------------
@dataclass
class DiskSummary:
    id: int
    path: str
    state: str
    reason: str
    capacity: int
    used: int
    free: int


@dataclass
class UsableCapacity:
    policy: str
    capacity: int   # data bytes the healthy disks hold under this policy, when empty
    free: int       # data bytes that still fit under this policy


@dataclass
class Status:
    pool: str
    uuid: str
    default_policy: str
    auto_means: str
    extent_size: int
    disks: list[DiskSummary]
    disks_by_state: dict[str, int]
    extents: int
    healthy: int
    under_redundant: int
    unreadable: int
    data_bytes: int
    raw_capacity: int      # healthy disks
    raw_used: int          # all disks
    raw_free: int          # healthy disks
    usable: list[UsableCapacity]
    repair_queue: int
    files_at_risk: list[str] = field(default_factory=list)
    files_at_risk_total: int = 0
    rebuild: RebuildState | None = None  # the mount daemon's background rebuild, if any
    survives_failures: int = 0  # arbitrary disk failures every extent survives now
    # Groups of disks (failed ones left out) that are directories on one filesystem: one
    # failure of its device fails them together, which survives_failures does not know.
    shared_filesystems: list[list[int]] = field(default_factory=list)


@operation("status", writes=False)
def status(pool: Pool) -> Status:
    store = pool.store
    disks = [DiskSummary(d.id, d.path, d.state, d.reason, store.disk_capacity(d.id), d.used,
                         store.disk_free(d.id) if d.writable else 0)
             for d in sorted(pool.disks.values(), key=lambda d: d.id)]
    by_state = {s: sum(1 for d in disks if d.state == s) for s in health.STATES}
    healthy_disks = [d for d in disks if d.state in health.WRITABLE]
    caps = [d.capacity for d in healthy_disks]
    frees = [d.free for d in healthy_disks]
    usable = [UsableCapacity(str(p), usable_capacity(caps, p.width, p.k),
                             usable_capacity(frees, p.width, p.k)) for p in CAPACITY_POLICIES]
    with pool.meta.read() as conn:
        extents = extent_health(conn)
        queued = conn.execute("SELECT count(*) FROM repair_queue").fetchone()[0]
        unreadable = [e.id for e in extents if e.state == UNREADABLE]
        # With the files whose write-back failed (their lost chunks read as I/O errors).
        at_risk = files_of_extents(conn, [*unreadable, LOST_EXTENT])
    default = pool.config.default_policy
    return Status(
        pool=str(pool.path), uuid=pool.config.uuid, default_policy=default,
        auto_means=describe_auto(len(healthy_disks)) if default == AUTO else default,
        extent_size=pool.config.extent_size, disks=disks, disks_by_state=by_state,
        extents=len(extents),
        healthy=sum(1 for e in extents if e.state == HEALTHY),
        under_redundant=sum(1 for e in extents if e.state == UNDER_REDUNDANT),
        unreadable=len(unreadable),
        data_bytes=sum(e.length for e in extents),
        raw_capacity=sum(caps), raw_used=sum(d.used for d in disks), raw_free=sum(frees),
        usable=usable, repair_queue=queued,
        files_at_risk=at_risk[:MAX_PATHS], files_at_risk_total=len(at_risk),
        rebuild=read_state(pool.path), survives_failures=failures_survivable(pool),
        shared_filesystems=_shared_filesystems(pool))


def _shared_filesystems(pool: Pool) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for d in sorted(pool.disks.values(), key=lambda d: d.id):
        if d.state != health.FAILED:
            groups.setdefault(pool.store.device_of(d.id), []).append(d.id)
    return [ids for ids in groups.values() if len(ids) > 1]


# -- list-extents -------------------------------------------------------------------------
@dataclass
class ExtentRow:
    id: int
    file: str        # '' when no file refers to the extent
    chunk: int | None
    length: int
    policy: str
    present: int     # fragments that count for redundancy
    width: int
    state: str


@operation("list-extents", writes=False)
def list_extents(pool: Pool, file: str | None = None) -> list[ExtentRow]:
    """Every extent with the file and chunk that refer to it (one row per reference)."""
    with pool.meta.read() as conn:
        if file is not None:
            ino = _file_ino(conn, file)
            refs = conn.execute("SELECT ino, chunk, extent_id FROM file_extents WHERE ino = ? "
                                "ORDER BY chunk", (ino,)).fetchall()
            by_id = {e.id: e for e in extent_health(conn, [r[2] for r in refs])}
        else:
            refs = conn.execute("SELECT ino, chunk, extent_id FROM file_extents").fetchall()
            by_id = {e.id: e for e in extent_health(conn)}
        namer = PathResolver(conn)
        names: dict[int, str] = {}
        rows: list[ExtentRow] = []
        referenced = set()
        for ino, chunk, extent_id in refs:
            e = by_id.get(extent_id)
            if e is None:
                continue
            referenced.add(extent_id)
            if ino not in names:
                names[ino] = namer.paths(ino)[0]
            rows.append(ExtentRow(e.id, names[ino], chunk, e.length, str(e.policy),
                                  e.counting, e.policy.width, e.state))
        if file is None:
            rows += [ExtentRow(e.id, "", None, e.length, str(e.policy), e.counting,
                               e.policy.width, e.state)
                     for e in by_id.values() if e.id not in referenced]
    rows.sort(key=lambda r: (r.file == "", r.file, r.chunk or 0, r.id))
    return rows


# -- show-redundancy ----------------------------------------------------------------------
@dataclass
class PolicyUsage:
    policy: str
    extents: int
    bytes: int       # file data
    raw_bytes: int   # fragments on disks, headers included
    overhead: float  # raw_bytes / bytes


@dataclass
class FragmentPlace:
    index: int
    disk_id: int
    disk_path: str
    disk_state: str
    size: int


@dataclass
class FileExtent:
    chunk: int
    extent_id: int
    policy: str
    length: int
    state: str
    fragments: list[FragmentPlace]


@dataclass
class Redundancy:
    file: str | None
    policies: list[PolicyUsage]
    extents: list[FileExtent] = field(default_factory=list)


@operation("show-redundancy", writes=False)
def show_redundancy(pool: Pool, file: str | None = None) -> Redundancy:
    with pool.meta.read() as conn:
        chunks: dict[int, int] = {}
        if file is not None:
            ino = _file_ino(conn, file)
            chunks = {row[1]: row[0] for row in conn.execute(
                "SELECT chunk, extent_id FROM file_extents WHERE ino = ? ORDER BY chunk",
                (ino,)).fetchall()}
            extents = extent_health(conn, list(chunks))
        else:
            extents = extent_health(conn)
        usage: dict[str, PolicyUsage] = {}
        for e in extents:
            u = usage.setdefault(str(e.policy), PolicyUsage(str(e.policy), 0, 0, 0, 0.0))
            u.extents += 1
            u.bytes += e.length
            u.raw_bytes += e.raw
        for u in usage.values():
            u.overhead = round(u.raw_bytes / u.bytes, 3) if u.bytes else 0.0
        result = Redundancy(file, sorted(usage.values(), key=lambda u: -u.bytes))
        if file is None:
            return result
        by_id = {e.id: e for e in extents}
        for extent_id, chunk in sorted(chunks.items(), key=lambda kv: kv[1]):
            e = by_id[extent_id]
            places = []
            for index, disk_id, size in conn.execute(
                    "SELECT idx, disk_id, size FROM fragments WHERE extent_id = ? ORDER BY idx",
                    (extent_id,)).fetchall():
                disk = pool.disks.get(disk_id)
                places.append(FragmentPlace(index, disk_id, disk.path if disk else "",
                                            disk.state if disk else "gone", size))
            result.extents.append(FileExtent(chunk, extent_id, str(e.policy), e.length,
                                             e.state, places))
    return result
