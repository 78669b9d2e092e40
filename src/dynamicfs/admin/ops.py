"""Operations: sync, metrics, health, the audit trail, the background scrub and its schedule.

Each works on a pool that is not mounted (in the CLI's process) and on a mounted one
(inside its daemon, through the control socket), except the background scrub
commands, which steer a thread of the mount daemon and say so when the pool is not
mounted. `scrub-schedule` only stores the schedule, so it works either way.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dynamicfs.admin.registry import operation
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import PoolError
from dynamicfs.maintenance import background
from dynamicfs.observability import health, metrics
from dynamicfs.observability.audit import KIND_PREFIX


@operation("metrics", writes=False)
def metrics_text(pool: Pool) -> str:
    """The Prometheus text exposition of the pool (and of the daemon, when mounted)."""
    return metrics.render(pool)


@operation("sync", writes=False)
def sync(pool: Pool) -> dict[str, Any]:
    """Commit the metadata. Inside a mount daemon, every operation that is not a
    monitoring one (control.server.NO_FLUSH) first writes out the buffered data of every
    file, open ones included: this one is run for that, as `dynamicfs sync`."""
    pool.meta.commit()
    return {"pool": str(pool.path), "commits": pool.meta.commits}


@operation("health", writes=False)
def health_report(pool: Pool, limit: int = health.DEFAULT_PATH_LIMIT) -> health.HealthReport:
    return health.build_report(pool, path_limit=max(0, int(limit)))


@operation("audit-log", writes=False)
def audit_log(pool: Pool, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` audit records, oldest first, from the `events` table."""
    with pool.meta.read() as conn:
        rows = conn.execute("SELECT time, kind, detail FROM events WHERE kind LIKE ? "
                            "ORDER BY id DESC LIMIT ?",
                            (KIND_PREFIX + "%", max(1, int(limit)))).fetchall()
    out = []
    for when, kind, detail in reversed(rows):
        try:
            fields = dict(json.loads(detail))
        except (ValueError, TypeError):
            fields = {"detail": detail}
        out.append({"time": when, "event": kind.removeprefix(KIND_PREFIX), **fields})
    return out


def _daemon_scrub(pool: Pool) -> background.BackgroundScrub:
    scrubber = background.for_pool(pool)
    if scrubber is None:
        raise PoolError(f"pool {pool.path} is not mounted: the background scrub runs in the "
                        "mount daemon; mount the pool first (or run 'dynamicfs scrub' now)")
    return scrubber


@operation("scrub-daemon-status", writes=False)
def scrub_daemon_status(pool: Pool) -> background.Status:
    return _daemon_scrub(pool).status()


@operation("scrub-daemon")
def scrub_daemon(pool: Pool, action: str, intensity: str | None = None) -> background.Status:
    """start | pause | resume | stop the background scrub of the mount daemon."""
    return _daemon_scrub(pool).command(action, intensity)


@operation("scrub-schedule")
def scrub_schedule(pool: Pool, frequency: str, intensity: str = background.DEFAULT_INTENSITY,
                   hour: int = background.DEFAULT_HOUR) -> dict[str, Any]:
    """Store when the mount daemon scrubs in the background (frequency 'off' clears it)."""
    schedule = background.save_schedule(pool, frequency, intensity, hour)
    pool.meta.commit()
    scrubber = background.for_pool(pool)
    if scrubber is not None:
        scrubber.schedule_changed()
    cursor = background.load_cursor(pool)
    return {"schedule": schedule, "mounted": scrubber is not None,
            "next_scheduled": background.next_due(schedule, cursor, time.time()),
            "mode": cursor.mode}
