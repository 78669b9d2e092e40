"""Integrity operations: scrub, repair, fsck, what-if, orphans, metadata copies.

Each registered operation runs offline (in the CLI's process) or inside the mount
daemon; `recover_metadata` is the exception: it runs when the pool cannot be opened
(its database is missing or corrupt), so it works on the pool directory directly.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from dynamicfs.admin.registry import Progress, jsonable, operation
from dynamicfs.engine.pool import Pool
from dynamicfs.maintenance import fsck as fsck_mod
from dynamicfs.maintenance import gc, metacopy, repair, scrub, whatif


def _with_clean(report: Any) -> dict[str, Any]:
    """The report as a dict, plus its `clean` verdict (a property, lost by asdict)."""
    doc: dict[str, Any] = jsonable(report)
    doc["clean"] = bool(report.clean)
    return doc


@operation("scrub", changes_with="repair")
def scrub_pool(pool: Pool, repair: bool = False, restart: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Check every fragment of every extent; with repair, rebuild what can be."""
    return _with_clean(scrub.scrub(pool, repair=repair, restart=restart, progress=progress))


@operation("scrub-status", writes=False)
def scrub_status(pool: Pool) -> dict[str, Any] | None:
    """Where the last scrub stands (None if the pool was never scrubbed)."""
    state = scrub.load_state(pool)
    if state is None:
        return None
    doc = asdict(state)
    with pool.meta.read() as conn:
        doc["problems"] = conn.execute("SELECT count(*) FROM scrub_problems WHERE state != ?",
                                       (scrub.REPAIRED,)).fetchone()[0]
    return doc


@operation("repair")
def repair_pool(pool: Pool, limit: int | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    """Rebuild queued and under-redundant extents, least redundant first."""
    return _with_clean(repair.rebuild_pending(pool, progress, limit))


@operation("fsck", changes_with="repair")
def fsck_pool(pool: Pool, repair: bool = False) -> dict[str, Any]:
    report = fsck_mod.fsck(pool, repair)
    doc = _with_clean(report)
    doc["repaired"] = report.repaired
    doc["remaining"] = report.remaining
    return doc


@operation("what-if", writes=False)
def what_if(pool: Pool, fail: list[str]) -> dict[str, Any]:
    report = whatif.what_if(pool, list(fail))
    doc: dict[str, Any] = jsonable(report)
    doc["loses_data"] = report.loses_data
    return doc


@operation("failures-survivable", writes=False)
def failures_survivable(pool: Pool) -> int:
    return whatif.failures_survivable(pool)


@operation("detect-orphans", writes=False)
def detect_orphans(pool: Pool) -> gc.OrphanScan:
    return gc.detect_orphans(pool)


@operation("cleanup-orphans")
def cleanup_orphans(pool: Pool, older_than: float = gc.DEFAULT_GRACE) -> gc.CleanupReport:
    return gc.cleanup_orphans(pool, older_than)


@operation("orphan-stats", writes=False)
def orphan_stats(pool: Pool) -> gc.OrphanStats:
    return gc.orphan_stats(pool)


@operation("copy-metadata")
def copy_metadata(pool: Pool) -> metacopy.CopyReport:
    return metacopy.copy_metadata(pool)


def recover_metadata(pool_dir: Path | str, disks: list[str] | None = None,
                     from_disk: str | None = None, force: bool = False) -> Any:
    """Restore POOL/pool.db from the newest valid copy on the disks (pool not opened)."""
    return jsonable(metacopy.recover(pool_dir, disks, from_disk, force))
