"""`remove-disk`: drain a disk (move its fragments to other disks), then remove it.

Keeps DESIGN invariant 7: when the disks that stay cannot hold every extent at its
policy's minimum, or an extent cannot be read, nothing changes and the error names
the files at stake, unless `force` is given. The work itself is
maintenance.drain; this wrapper decides, names files and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamicfs.admin.disks import find_disk
from dynamicfs.admin.inspect import MAX_PATHS, files_of_extents
from dynamicfs.admin.registry import Progress, operation
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DataAtRiskError
from dynamicfs.maintenance.drain import DrainPlan, DrainResult, drain_disk, plan_drain

SHOWN_PATHS = 5


@dataclass
class RemoveReport:
    disk_id: int
    path: str
    removed: bool
    label_removed: bool
    extents: int
    fragments_moved: int
    bytes_moved: int
    under_redundant: int
    below_minimum: int
    files_under_redundant: list[str] = field(default_factory=list)
    files_below_minimum: list[str] = field(default_factory=list)


def _name_files(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN_PATHS])
    more = len(paths) - SHOWN_PATHS
    return shown + (f" and {more} more" if more > 0 else "")


def _why(plan: DrainPlan) -> str:
    reasons = []
    if plan.too_few_disks:
        reasons.append(f"{len(plan.too_few_disks)} below their policy's minimum: too few "
                       "disks would remain")
    if plan.no_space:
        reasons.append(f"{len(plan.no_space)} below their policy's minimum: the other disks "
                       "lack free space")
    if plan.unreadable:
        reasons.append(f"{len(plan.unreadable)} unreadable now")
    return ", ".join(reasons)


def _at_stake(pool: Pool, extent_ids: list[int]) -> list[str]:
    with pool.meta.read() as conn:
        return files_of_extents(conn, extent_ids)


@operation("remove-disk")
def remove_disk(pool: Pool, ref: str, force: bool = False,
                progress: Progress | None = None) -> RemoveReport:
    disk = find_disk(pool, ref)
    plan = plan_drain(pool, disk.id)
    if not plan.safe and not force:
        paths = _at_stake(pool, plan.at_stake)
        raise DataAtRiskError(
            f"removing disk {disk.id} ({disk.path}) would put {len(plan.at_stake)} extents at "
            f"risk ({_why(plan)}); files at stake: {_name_files(paths)}; add disks or free "
            "space first, or use --force to remove it anyway", paths)
    result = drain_disk(pool, disk.id, force=force, progress=progress)
    if result.stuck:
        paths = _at_stake(pool, result.stuck)
        raise DataAtRiskError(
            f"disk {disk.id} ({disk.path}) is still draining: {len(result.stuck)} extents found "
            f"no room elsewhere; files at stake: {_name_files(paths)}; add disks or free space "
            "and run remove-disk again, or use --force", paths)
    return _report(pool, result)


def _report(pool: Pool, result: DrainResult) -> RemoveReport:
    under = _at_stake(pool, result.under_redundant) if result.under_redundant else []
    below = _at_stake(pool, result.below_minimum) if result.below_minimum else []
    return RemoveReport(result.disk_id, result.path, result.removed, result.label_removed,
                        result.extents, result.moved, result.bytes_moved,
                        len(result.under_redundant), len(result.below_minimum),
                        under[:MAX_PATHS], below[:MAX_PATHS])
