"""Disk operations: add-disk, list-disks, set-disk-health, fail-disk, probe-disks."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynamicfs.admin.inspect import files_of_extents
from dynamicfs.admin.registry import operation
from dynamicfs.disks import health
from dynamicfs.disks.directory import DirectoryDisk
from dynamicfs.disks.label import LABEL_NAME, Label, LabelError, read_label, write_label
from dynamicfs.engine.pool import DiskInfo, Pool
from dynamicfs.errors import DataAtRiskError, DiskError
from dynamicfs.redundancy.policy import parse_concrete

DEFAULT_TIER = "default"


@dataclass
class DiskRow:
    id: int
    uuid: str
    path: str
    tier: str
    state: str
    reason: str
    capacity: int
    used: int
    fragments: int
    read_errors: int
    write_errors: int
    checksum_errors: int
    # Other disks of the pool on the same filesystem: they share its free space, and a
    # failure of its device takes them all.
    shares_filesystem_with: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


@operation("add-disk")
def add_disk(pool: Pool, path: Path | str, capacity: int | None = None,
             tier: str = DEFAULT_TIER) -> DiskRow:
    root = Path(path).absolute()
    if not root.exists():
        raise DiskError(f"disk path {root} does not exist; create the directory first")
    if not root.is_dir():
        raise DiskError(f"disk path {root} is not a directory")
    root = root.resolve()
    if _inside(root, pool.path.resolve()) or _inside(pool.path.resolve(), root):
        raise DiskError(f"{root} overlaps the pool directory {pool.path}; use a separate directory")
    for d in pool.disks.values():
        other = Path(d.path)
        if root == other:
            raise DiskError(f"{root} is already disk {d.id} of this pool")
        if _inside(root, other) or _inside(other, root):
            raise DiskError(f"{root} overlaps disk {d.id} ({other}); disks must not nest")
    try:
        label = read_label(root)
    except LabelError as exc:
        if str(exc) != "no label":
            raise DiskError(f"{root} has a damaged DynamicFS label ({exc}); "
                            "wipe it only if the disk holds nothing you need") from None
    else:
        if label.pool_uuid == pool.config.uuid:
            if all(d.uuid != label.disk_uuid for d in pool.disks.values()):
                raise DiskError(f"{root} was a disk of this pool that has been removed; delete "
                                f"{root / LABEL_NAME} and any 'fragments' directory there to "
                                "add it again")
            raise DiskError(f"{root} already belongs to this pool (disk {label.disk_uuid})")
        raise DiskError(f"{root} belongs to another pool ({label.pool_uuid}); "
                        "remove it from that pool first")
    if not os.access(root, os.W_OK):
        raise DiskError(f"disk path {root} is not writable")
    if not tier or not tier.replace("-", "").replace("_", "").isalnum():
        raise DiskError(f"malformed tier name {tier!r}: use letters, digits, '-' or '_'")
    disk_uuid = str(uuid.uuid4())
    try:
        DirectoryDisk(root).prepare()
    except OSError as exc:
        raise DiskError(f"cannot create the segment directory in {root}: "
                        f"{exc.strerror}") from None
    try:
        write_label(root, Label(pool.config.uuid, disk_uuid))
    except OSError as exc:
        raise DiskError(f"cannot write the label on {root}: {exc.strerror}") from None
    with pool.meta.write() as conn:
        cur = conn.execute("INSERT INTO disks (uuid, path, tier, state, capacity, added) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (disk_uuid, str(root), tier, health.HEALTHY, capacity, time.time()))
        disk_id = cur.lastrowid
    pool.record_event("add-disk", {"disk": disk_id, "path": str(root), "capacity": capacity,
                                   "tier": tier})
    pool.meta.commit()
    pool.reload_disks()
    assert disk_id is not None
    return _row(pool, pool.disks[disk_id])


def _row(pool: Pool, d: DiskInfo) -> DiskRow:
    with pool.meta.read() as conn:
        count = conn.execute("SELECT count(*) FROM fragments WHERE disk_id = ?",
                             (d.id,)).fetchone()[0]
    return DiskRow(d.id, d.uuid, d.path, d.tier, d.state, d.reason,
                   pool.store.disk_capacity(d.id), d.used, count, d.read_errors,
                   d.write_errors, d.checksum_errors, pool.store.sharing_filesystem(d.id))


@operation("list-disks", writes=False)
def list_disks(pool: Pool) -> list[DiskRow]:
    return [_row(pool, d) for d in sorted(pool.disks.values(), key=lambda d: d.id)]


def find_disk(pool: Pool, ref: str) -> DiskInfo:
    disk = pool.disk_by_ref(ref)
    if disk is None:
        known = ", ".join(f"{d.id} ({d.path})" for d in pool.disks.values()) or "none"
        raise DiskError(f"unknown disk {ref!r}; disks of this pool: {known}")
    return disk


@operation("set-disk-health")
def set_disk_health(pool: Pool, ref: str, state: str, reason: str = "set by operator",
                    force: bool = False) -> DiskRow:
    """Set a disk's health state. Failing a disk that the only readable copies of some
    extents depend on is refused, naming the files, unless `force` (invariant 7)."""
    if state not in health.STATES:
        raise DiskError(f"unknown health state {state!r}; use one of: {', '.join(health.STATES)}")
    disk = find_disk(pool, ref)
    if state not in health.READABLE and not force:
        _refuse_if_needed(pool, disk, state)
    if (disk.state, disk.reason) != (state, reason):
        _set_state(pool, disk, state, reason)
    return _row(pool, pool.disks[disk.id])


def _refuse_if_needed(pool: Pool, disk: DiskInfo, state: str) -> None:
    at_stake = extents_needing(pool, disk.id)
    if not at_stake:
        return
    with pool.meta.read() as conn:
        paths = files_of_extents(conn, at_stake)
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    raise DataAtRiskError(f"making disk {disk.id} ({disk.path}) {state} would leave "
                          f"{len(at_stake)} extents unreadable; files at stake: {shown}; "
                          "repair or add disks first, or use --force", paths)


def extents_needing(pool: Pool, disk_id: int) -> list[int]:
    """Extents readable now that would not be without this disk."""
    readable = ",".join(f"'{s}'" for s in sorted(health.READABLE))
    with pool.meta.read() as conn:
        rows = conn.execute(
            f"SELECT e.id, e.policy, "
            f"count(DISTINCT CASE WHEN d.state IN ({readable}) THEN f.idx END), "
            f"count(DISTINCT CASE WHEN d.state IN ({readable}) AND f.disk_id != ? "
            f"THEN f.idx END) "
            "FROM extents e JOIN fragments f ON f.extent_id = e.id "
            "LEFT JOIN disks d ON d.id = f.disk_id "
            "WHERE e.id IN (SELECT extent_id FROM fragments WHERE disk_id = ?) GROUP BY e.id",
            (disk_id, disk_id)).fetchall()
    out = []
    for extent_id, policy, now, without in rows:
        k = parse_concrete(policy).k
        if now >= k > without:
            out.append(extent_id)
    return out


def _set_state(pool: Pool, disk: DiskInfo, state: str, reason: str) -> None:
    with pool.meta.write() as conn:
        conn.execute("UPDATE disks SET state = ?, reason = ? WHERE id = ?",
                     (state, reason, disk.id))
    pool.record_event("disk-health", {"disk": disk.id, "from": disk.state, "to": state,
                                      "reason": reason})
    pool.meta.commit()
    pool.reload_disks()


@operation("fail-disk")
def fail_disk(pool: Pool, ref: str, force: bool = False) -> DiskRow:
    return set_disk_health(pool, ref, health.FAILED, "failed by operator", force=force)


@dataclass
class ProbeRow:
    id: int
    path: str
    before: str
    after: str
    reason: str


@operation("probe-disks")
def probe_disks(pool: Pool) -> list[ProbeRow]:
    """Check every disk; failing ones become failed or suspect, recovered ones healthy."""
    out = []
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        result = DirectoryDisk(disk.path).probe(pool.config.uuid, disk.uuid)
        after = _after_probe(disk, result.state)
        if after != disk.state:
            _set_state(pool, disk, after, f"probe: {result.reason}" if result.state else "")
        out.append(ProbeRow(disk.id, disk.path, disk.state, after, result.reason))
    return out


def _after_probe(disk: DiskInfo, found: str | None) -> str:
    """The state a probe result leads to. Only states a probe set are undone by one."""
    by_probe = disk.reason.startswith("probe:")
    if found == health.FAILED:
        return health.FAILED
    if found == health.SUSPECT:
        if disk.state == health.HEALTHY or (disk.state == health.FAILED and by_probe):
            return health.SUSPECT
        return disk.state
    if disk.state in (health.FAILED, health.SUSPECT) and by_probe:
        return health.HEALTHY
    return disk.state
