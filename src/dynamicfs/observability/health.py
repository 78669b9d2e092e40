"""The health report: is the pool whole, and if not, what is at risk.

One document answers a monitoring check: every disk's state and error counters, how
many extents are healthy, under-redundant or unreadable (and the first files hit),
the last scrub and the background scrub, the repair queue and the metadata copies.
Its `status` is `healthy`, `degraded` (everything readable, but less redundant than
asked, or a disk not healthy, or repairs pending) or `unreadable` (some data cannot be
read); `exit_code` is 0, 1 or 2 so that cron and monitoring can act on it.

Where each extent stands is counted from the metadata alone, in one GROUP BY pass:
an extent is under-redundant when fewer than its policy's width of fragments sit on
disks whose fragments count for redundancy, unreadable when fewer than k sit on
readable disks. A scrub finds what the metadata cannot show (rotten or missing
fragments); its findings are reported beside these counts.

Heavy queries run on a read-only connection of their own (`reader()`): SQLite's WAL
lets them read the last committed state without taking the pool's metadata lock, so
a report on a large pool never stalls the filesystem.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynamicfs.disks.health import COUNTS_FOR_REDUNDANCY, HEALTHY, READABLE
from dynamicfs.disks.label import LABEL_NAME
from dynamicfs.meta.paths import PathResolver
from dynamicfs.meta.schema import LOST_EXTENT

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool
    from dynamicfs.meta.store import MetaStore

HEALTHY_STATUS = "healthy"
DEGRADED = "degraded"
UNREADABLE = "unreadable"
EXIT_CODES = {HEALTHY_STATUS: 0, DEGRADED: 1, UNREADABLE: 2}
EXTENT_STATES = ("healthy", "under_redundant", "unreadable")
# Files listed per category of extents at risk.
DEFAULT_PATH_LIMIT = 20
METADATA_DIR = "metadata"


# -- a read-only connection per pool ----------------------------------------------------
class Reader:
    """Queries on a pool's metadata: heavy ones on a read-only connection of their own
    (shared under its own lock; they see the last committed state), small ones through
    the pool's connection (`live`: they also see changes not yet committed)."""

    def __init__(self, meta: MetaStore) -> None:
        self.meta = meta
        self.conn = meta.open_reader()
        self.lock = threading.Lock()

    def query(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            return self.conn.execute(sql, tuple(params)).fetchall()

    def live(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        with self.meta.read() as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    def tables(self) -> set[str]:
        return {str(r[0]) for r in self.live("SELECT name FROM sqlite_master "
                                            "WHERE type = 'table'")}


_readers: weakref.WeakKeyDictionary[Pool, Reader] = weakref.WeakKeyDictionary()
_readers_lock = threading.Lock()


def reader(pool: Pool) -> Reader:
    with _readers_lock:
        found = _readers.get(pool)
        if found is None:
            found = _readers[pool] = Reader(pool.meta)
        return found


# -- extents by state -------------------------------------------------------------------
@dataclass
class ExtentCounts:
    total: int = 0
    healthy: int = 0
    under_redundant: int = 0
    unreadable: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXTENT_STATES, 0))

    def add(self, state: str, count: int, nbytes: int) -> None:
        setattr(self, state, getattr(self, state) + count)
        self.bytes[state] += nbytes
        self.total += count


def _disk_lists(pool: Pool) -> tuple[str, str]:
    """SQL lists of the disk ids whose fragments count for redundancy / can be read."""
    disks = list(pool.disks.values())
    counting = ",".join(str(int(d.id)) for d in disks if d.state in COUNTS_FOR_REDUNDANCY)
    readable = ",".join(str(int(d.id)) for d in disks if d.state in READABLE)
    return counting, readable


def _policy_shape(text: str) -> tuple[int, int]:
    """(k, width) of a stored policy string: replicate:N or ec:K+M."""
    kind, _, rest = text.partition(":")
    if kind == "ec":
        k, _, m = rest.partition("+")
        return int(k), int(k) + int(m)
    return 1, int(rest)


def extent_state(k: int, width: int, counting: int, readable: int) -> str:
    if readable < k:
        return "unreadable"
    if counting < width:
        return "under_redundant"
    return "healthy"


def count_extents(pool: Pool, db: Reader) -> ExtentCounts:
    """Extents (and their bytes) by state, from the metadata, in one grouped query."""
    counting, readable = _disk_lists(pool)
    rows = db.query(
        "SELECT policy, good, readable, count(*), sum(length) FROM ("
        " SELECT e.policy AS policy, e.length AS length,"
        f" sum(f.disk_id IN ({counting})) AS good, sum(f.disk_id IN ({readable})) AS readable"
        " FROM extents e LEFT JOIN fragments f ON f.extent_id = e.id GROUP BY e.id"
        ") GROUP BY policy, good, readable")
    out = ExtentCounts()
    for policy, good, can_read, count, nbytes in rows:
        k, width = _policy_shape(str(policy))
        state = extent_state(k, width, int(good or 0), int(can_read or 0))
        out.add(state, int(count), int(nbytes or 0))
    return out


def extents_at_risk(pool: Pool, db: Reader, limit: int) -> dict[str, list[int]]:
    """The first `limit` extent ids per risky state, in id order."""
    counting, readable = _disk_lists(pool)
    rows = db.query(
        "SELECT e.id, e.policy,"
        f" sum(f.disk_id IN ({counting})), sum(f.disk_id IN ({readable}))"
        " FROM extents e LEFT JOIN fragments f ON f.extent_id = e.id GROUP BY e.id")
    out: dict[str, list[int]] = {"under_redundant": [], "unreadable": []}
    for extent_id, policy, good, can_read in rows:
        k, width = _policy_shape(str(policy))
        state = extent_state(k, width, int(good or 0), int(can_read or 0))
        if state != "healthy" and len(out[state]) < limit:
            out[state].append(int(extent_id))
        if all(len(v) >= limit for v in out.values()):
            break
    return out


def paths_of_extents(db: Reader, extent_ids: list[int], limit: int) -> list[str]:
    """Paths of the files holding these extents (at most `limit`, one per file: the
    first of a file's hard links), '<inode N>' if detached."""
    out: list[str] = []
    seen: set[int] = set()
    with db.lock:
        resolver = PathResolver(db.conn)
        for extent_id in extent_ids:
            for ino in resolver.inodes_of_extent(extent_id):
                if ino in seen:
                    continue
                seen.add(ino)
                out.append(resolver.paths(ino)[0])
                if len(out) >= limit:
                    return out
    return out


# -- scrubs -----------------------------------------------------------------------------
@dataclass
class ScrubSummary:
    """Where the last scrub (manual or background) stands."""

    kind: str
    started: float | None
    finished: float | None
    in_progress: bool
    checked: int
    remaining: int
    progress: float
    problems: dict[str, int]
    detail: dict[str, object] = field(default_factory=dict)


def _summary(kind: str, started: float | None, finished: float | None, in_progress: bool,
             checked: int, remaining: int, problems: dict[str, int],
             detail: dict[str, object]) -> ScrubSummary:
    total = checked + remaining
    progress = 1.0 if total == 0 else round(checked / total, 4)
    return ScrubSummary(kind, started, finished, in_progress, checked, remaining, progress,
                        problems, detail)


def _remaining_after(db: Reader, position: int) -> int:
    return int(db.query("SELECT count(*) FROM extents WHERE id > ?", (position,))[0][0])


def manual_scrub(db: Reader, tables: set[str]) -> ScrubSummary | None:
    """The last `dynamicfs scrub` (the scrub_state row), if the pool was ever scrubbed."""
    if "scrub_state" not in tables:
        return None
    rows = db.live("SELECT started, position, finished, checked, under_redundant, repaired, "
                    "unreadable, fragment_bytes, elapsed FROM scrub_state WHERE id = 1")
    if not rows:
        return None
    started, position, finished, checked, under, repaired, unreadable, nbytes, elapsed = rows[0]
    remaining = 0 if finished is not None else _remaining_after(db, int(position))
    return _summary("manual", started, finished, finished is None, int(checked), remaining,
                    {"under_redundant": int(under), "repaired": int(repaired),
                     "unreadable": int(unreadable)},
                    {"fragment_bytes": nbytes, "elapsed": elapsed})


def background_scrub(db: Reader, tables: set[str]) -> ScrubSummary | None:
    """The background scrub's cursor and passes (see maintenance/background.py)."""
    if "background_scrub" not in tables:
        return None
    rows = db.live("SELECT mode, intensity, position, pass_started, pass_checked, pass_bytes, "
                    "pass_problems, pass_repaired, last_pass_started, last_pass_finished, "
                    "last_pass_checked, last_pass_problems, passes FROM background_scrub "
                    "WHERE id = 1")
    if not rows:
        return None
    (mode, intensity, position, pass_started, checked, nbytes, problems, repaired,
     last_started, last_finished, last_checked, last_problems, passes) = rows[0]
    detail: dict[str, object] = {"mode": mode, "intensity": intensity, "passes": passes,
                                 "last_pass_started": last_started,
                                 "last_pass_finished": last_finished}
    if pass_started is not None:
        return _summary("background", pass_started, None, True, int(checked),
                        _remaining_after(db, int(position)),
                        {"problems": int(problems), "repaired": int(repaired)},
                        {**detail, "fragment_bytes": nbytes})
    return _summary("background", last_started, last_finished, False, int(last_checked), 0,
                    {"problems": int(last_problems)}, detail)


def scrub_findings(db: Reader, tables: set[str]) -> dict[str, list[int]]:
    """Extents the last scrub found in trouble and that still exist, by state."""
    if "scrub_problems" not in tables:
        return {}
    rows = db.live("SELECT p.extent_id, p.state FROM scrub_problems p "
                    "JOIN extents e ON e.id = p.extent_id ORDER BY p.extent_id")
    out: dict[str, list[int]] = {}
    for extent_id, state in rows:
        out.setdefault(str(state), []).append(int(extent_id))
    return out


# -- metadata copies ----------------------------------------------------------------------
@dataclass
class MetadataCopy:
    """The copies of the metadata database one disk holds (<disk>/metadata/pool-N.*)."""

    disk: int
    path: str
    generations: list[int]
    newest: int | None
    created: float | None


def _manifests(metadata_dir: Path) -> dict[int, float]:
    """generation -> creation time, for every readable manifest pool-N.json."""
    out: dict[int, float] = {}
    try:
        names = os.listdir(metadata_dir)
    except OSError:
        return out
    for name in names:
        if not (name.startswith("pool-") and name.endswith(".json")):
            continue
        try:
            doc = json.loads((metadata_dir / name).read_text())
            out[int(doc["generation"])] = float(doc["created"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def metadata_copies(pool: Pool, db: Reader, tables: set[str]
                    ) -> tuple[dict[str, object] | None, list[MetadataCopy]]:
    """The generation recorded in metadata_copies, and the copies each disk holds."""
    recorded = None
    if "metadata_copies" in tables:
        rows = db.live("SELECT generation, copied, disks FROM metadata_copies WHERE id = 1")
        if rows:
            recorded = {"generation": rows[0][0], "copied": rows[0][1], "disks": rows[0][2]}
    copies = []
    for disk in sorted(pool.disks.values(), key=lambda d: d.id):
        where = Path(disk.path) / METADATA_DIR
        found = _manifests(where)
        if found:
            newest = max(found)
            copies.append(MetadataCopy(disk.id, str(where), sorted(found), newest, found[newest]))
    return recorded, copies


# -- the report ---------------------------------------------------------------------------
@dataclass
class DiskHealth:
    id: int
    path: str
    tier: str
    state: str
    reason: str
    capacity: int
    used: int
    read_errors: int
    write_errors: int
    checksum_errors: int


@dataclass
class HealthReport:
    pool: str
    uuid: str
    time: float
    status: str
    exit_code: int
    problems: list[str]
    warnings: list[str]
    disks: list[DiskHealth]
    extents: ExtentCounts
    at_risk: dict[str, list[str]]
    repair_queue: int
    last_scrub: ScrubSummary | None
    background_scrub: ScrubSummary | None
    scrub_findings: dict[str, int]
    metadata_generation: dict[str, object] | None
    metadata_copies: list[MetadataCopy]
    lost_chunks: int = 0  # chunks of files whose write-back failed (LOST_EXTENT)


def disk_health(pool: Pool) -> list[DiskHealth]:
    out = []
    for d in sorted(pool.disks.values(), key=lambda d: d.id):
        try:
            capacity = pool.store.disk_capacity(d.id)
        except OSError:
            capacity = d.capacity or 0
        out.append(DiskHealth(d.id, d.path, d.tier, d.state, d.reason, capacity, d.used,
                              d.read_errors, d.write_errors, d.checksum_errors))
    return out


def repair_backlog(pool: Pool, db: Reader) -> int:
    """Extents waiting for repair: the repair queue and those the daemon noticed since."""
    queued = {int(r[0]) for r in db.live("SELECT extent_id FROM repair_queue")}
    return len(queued | set(pool.store.repair_wanted))


def build_report(pool: Pool, path_limit: int = DEFAULT_PATH_LIMIT) -> HealthReport:
    db = reader(pool)
    tables = db.tables()
    disks = disk_health(pool)
    counts = count_extents(pool, db)
    findings = scrub_findings(db, tables)
    risky = extents_at_risk(pool, db, path_limit) if counts.unreadable or counts.under_redundant \
        else {"under_redundant": [], "unreadable": []}
    for state, ids in findings.items():
        key = "unreadable" if state == "unreadable" else "under_redundant"
        if state != "repaired":
            risky[key] = sorted(set(risky[key]) | set(ids))[:path_limit]
    lost = int(db.query("SELECT count(*) FROM file_extents WHERE extent_id = ?",
                        (LOST_EXTENT,))[0][0])
    if lost:  # their files read as I/O errors there, as those of unreadable extents do
        risky["unreadable"] = [*risky["unreadable"], LOST_EXTENT]
    at_risk = {state: paths_of_extents(db, ids, path_limit) for state, ids in risky.items()}
    backlog = repair_backlog(pool, db)
    generation, copies = metadata_copies(pool, db, tables)
    report = HealthReport(
        str(pool.path), pool.config.uuid, time.time(), HEALTHY_STATUS, 0, [], [], disks, counts,
        at_risk, backlog, manual_scrub(db, tables), background_scrub(db, tables),
        {state: len(ids) for state, ids in findings.items()}, generation, copies, lost)
    # A disk whose directory (or label) went away since it was last probed: its state
    # still says healthy until a probe or a failed read; the report says so now.
    missing = [d.id for d in disks if d.state != "failed"
               and not os.path.isfile(os.path.join(d.path, LABEL_NAME))]
    judge(report, findings, missing)
    return report


def judge(report: HealthReport, findings: dict[str, list[int]],
          missing: Iterable[int] = ()) -> None:
    """Fill status, exit_code, problems and warnings from the facts gathered."""
    problems, warnings = report.problems, report.warnings
    counts = report.extents
    if counts.unreadable:
        problems.append(f"{counts.unreadable} extents are unreadable (too few fragments on "
                        "readable disks)")
    if findings.get("unreadable"):
        problems.append(f"the last scrub found {len(findings['unreadable'])} unreadable extents")
    if report.lost_chunks:
        problems.append(f"{report.lost_chunks} chunks of files were never stored (their "
                        "write-back failed) and read as I/O errors; 'dynamicfs fsck' lists them")
    unreadable = bool(problems)
    if counts.under_redundant:
        problems.append(f"{counts.under_redundant} extents are under-redundant")
    if findings.get("under-redundant"):
        problems.append(f"the last scrub found {len(findings['under-redundant'])} "
                        "under-redundant extents")
    if report.repair_queue:
        problems.append(f"{report.repair_queue} extents wait for repair")
    gone = set(missing)
    for d in report.disks:
        if d.id in gone:
            problems.append(f"disk {d.id} ({d.path}) is missing: no DynamicFS label there; "
                            f"put it back, or run 'dynamicfs probe-disks {report.pool}'")
        elif d.state not in (HEALTHY, "draining"):
            problems.append(f"disk {d.id} ({d.path}) is {d.state}"
                            + (f": {d.reason}" if d.reason else ""))
        elif d.state == "draining":
            warnings.append(f"disk {d.id} ({d.path}) is draining")
        errors = d.read_errors + d.write_errors + d.checksum_errors
        if errors and d.state == HEALTHY:
            warnings.append(f"disk {d.id} has seen {d.read_errors} read, {d.write_errors} "
                            f"write and {d.checksum_errors} checksum errors")
    if not report.disks:
        warnings.append("the pool has no disks; add one with 'dynamicfs add-disk'")
    recorded = report.metadata_generation
    if recorded is not None:
        generation = int(str(recorded["generation"]))
        if not any(c.newest == generation for c in report.metadata_copies):
            warnings.append(f"no disk holds metadata copy generation {generation}; run "
                            "'dynamicfs copy-metadata'")
    last = report.last_scrub
    if counts.total and last is None and (report.background_scrub is None
                                          or report.background_scrub.started is None):
        warnings.append("the pool has never been scrubbed; run 'dynamicfs scrub' or set "
                        "'dynamicfs scrub-schedule'")
    report.status = UNREADABLE if unreadable else (DEGRADED if problems else HEALTHY_STATUS)
    report.exit_code = EXIT_CODES[report.status]
