"""The background rebuilder of the mount daemon: lazy, extent by extent self-healing.

A thread that, every few seconds and whenever woken:
- moves extents the read path found bad into the persistent repair queue;
- rebuilds what needs it (queued extents, extents with fragments on failed or vanished
  disks, under-redundant extents), least redundancy left first, a round of at most
  ROUND extents at a time, committing as it goes (maintenance.repair.rebuild_pending);
- once nothing else is pending, drains suspect disks: their fragments are re-created
  on healthy disks, so a disk that keeps failing checks empties itself.

Progress lives in the metadata (the repair queue and the fragments themselves), so a
remount resumes where the last one stopped. `POOL/rebuild.json` says how the current
pass is going (done, total, rate, estimate of the time left) for `status`.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynamicfs.disks import health
from dynamicfs.engine.store import ExtentInfo, RebuiltExtent
from dynamicfs.errors import DynamicFSError
from dynamicfs.maintenance.parallel import Outcome, rebuild_in_batches
from dynamicfs.maintenance.repair import (
    REPAIR_WORKERS,
    pending_repairs,
    persist_repair_wanted,
    rebuild_pending,
)
from dynamicfs.observability.log import error, log

if TYPE_CHECKING:
    from sqlite3 import Connection

    from dynamicfs.engine.pool import Pool

STATE_FILE = "rebuild.json"
INTERVAL = 2.0
ROUND = 64


@dataclass
class RebuildState:
    """How the current rebuild pass is going, as `status` shows it."""

    active: bool = False
    started: float = 0.0
    total: int = 0
    done: int = 0
    failed: int = 0
    rate: float = 0.0  # extents per second
    eta_seconds: float | None = None
    updated: float = 0.0


def read_state(pool_dir: Path) -> RebuildState | None:
    try:
        raw = json.loads((Path(pool_dir) / STATE_FILE).read_text())
        return RebuildState(**raw)
    except (OSError, ValueError, TypeError):
        return None


class BackgroundRebuild:
    def __init__(self, pool: Pool, *, interval: float = INTERVAL) -> None:
        self.pool = pool
        self.interval = interval
        self.state = RebuildState()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dynamicfs-rebuild", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        # What reads found bad since the last round goes into the repair queue (committed
        # when the pool closes), or the next mount would not know of it.
        try:
            persist_repair_wanted(self.pool)
        except Exception as exc:
            error("could not queue the repairs reads asked for", reason=repr(exc))

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # keep healing on the next round
                error("background rebuild failed", reason=repr(exc))
                busy = False
            if not busy:
                self._wake.wait(self.interval)
                self._wake.clear()

    def step(self) -> bool:
        """One round; True when there is more to do right away."""
        persist_repair_wanted(self.pool)
        pending = len(pending_repairs(self.pool))
        if pending:
            self._begin(pending)
            report = rebuild_pending(self.pool, limit=ROUND, should_stop=self._stop.is_set)
            fixed = report.repaired + report.already_healthy
            self.state.done += fixed
            self.state.failed += report.unreadable + report.stuck
            remaining = pending - fixed
            if remaining <= 0 or fixed == 0:
                self._finish(remaining)
            else:
                self._save(remaining)
            return fixed > 0
        if self._drain_suspects():
            return True
        if self.state.active:
            self._finish(0)
        return False

    def _finish(self, remaining: int) -> None:
        """End the pass; what could not be fixed is tried again on the next rounds."""
        self.state.active = False
        self._save(remaining)
        log("rebuild pass finished", done=self.state.done, failed=self.state.failed,
            remaining=remaining)

    def _begin(self, pending: int) -> None:
        if not self.state.active:
            self.state = RebuildState(active=True, started=time.time(), total=pending)
            log("rebuild started", extents=pending)
        self.state.total = max(self.state.total, self.state.done + pending)

    def _save(self, remaining: int) -> None:
        now = time.time()
        elapsed = max(1e-3, now - self.state.started)
        self.state.rate = round(self.state.done / elapsed, 2)
        self.state.eta_seconds = (round(remaining / self.state.rate, 1)
                                  if self.state.rate > 0 else None)
        self.state.updated = now
        path = Path(self.pool.path) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, path)

    def _drain_suspects(self) -> bool:
        """Move up to ROUND extents' fragments off suspect disks; True if any moved."""
        suspects = frozenset(d.id for d in self.pool.disks.values()
                             if d.state == health.SUSPECT)
        if not suspects:
            return False
        marks = ",".join("?" * len(suspects))
        with self.pool.meta.read() as conn:
            rows = conn.execute(f"SELECT DISTINCT extent_id FROM fragments WHERE disk_id IN "
                                f"({marks}) LIMIT ?", (*suspects, ROUND)).fetchall()

        def prepare(_: int, info: ExtentInfo) -> RebuiltExtent | str:
            return self.pool.store.prepare_rebuild(info, evacuate=suspects)

        def settle(_: Connection, extent_id: int, __: ExtentInfo | None,
                   outcome: Outcome) -> bool:
            if isinstance(outcome, (DynamicFSError, OSError)):
                log("could not move extent off a suspect disk", extent=extent_id,
                    reason=str(outcome))
            return outcome == "repaired"

        extents = itertools.takewhile(lambda _: not self._stop.is_set(), (r[0] for r in rows))
        moved = sum(ok for batch in rebuild_in_batches(
            self.pool, extents, lambda e: e, prepare, settle, threads=REPAIR_WORKERS,
            name="dynamicfs-repair") for _, ok in batch)
        self.pool.meta.commit()
        return moved > 0
