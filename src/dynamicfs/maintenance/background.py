"""The background scrub: a thread in the mount daemon that keeps checking every extent.

It walks the extents in id order with a cursor stored in `background_scrub`, checking
each with scrub.check_extent (every fragment read and verified, the extent decoded and
checked) and repairing what it finds under-redundant with ExtentStore.rebuild. A pass
runs from the lowest extent id to the highest; an interrupted pass (unmount, stop)
resumes at the cursor. Checking in id order is checking the oldest-verified data
first: everything after the cursor was last verified by the previous pass, before
everything behind it, and extents written since the previous pass (the highest ids)
come last, as their checksums were verified when they were written.

Rate and manners:
- intensity low / medium / high caps the fragment bytes read at 10 / 50 / 200 MB/s;
- it yields to user I/O: before each extent it waits until neither a FUSE request
  (observability.metrics.last_fuse_request) nor fragment I/O by anyone else has been
  seen for QUIET seconds, but never longer than MAX_YIELD, so that under constant load
  it still moves, one extent every MAX_YIELD seconds.

Modes (persisted, so they survive remounts): `idle` (no pass under way; waits for the
schedule), `running`, `paused` (pass kept, nothing read), `stopped` (pass kept, the
schedule suspended until `start`). The schedule (`scrub_schedule`: nightly, weekly or
continuous, an intensity and a start hour) is followed while idle: a nightly pass is
due once the day's start hour has passed and no pass started since the previous one;
a weekly one when, in addition, the last pass started more than six days before; a
continuous schedule starts the next pass as soon as one ends. Passes missed while the
pool was not mounted start at the next mount.

Every repair is audited (observability.audit, event `repair`); problems found go to
`scrub_problems` and, unless repaired, to `repair_queue`, like those of `dynamicfs
scrub`. Progress and counters are written to the metadata at most every SAVE_EVERY
seconds and become durable with the daemon's next group commit.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from dynamicfs.errors import DynamicFSError, UnreadableError
from dynamicfs.maintenance import scrub
from dynamicfs.observability import metrics
from dynamicfs.observability.audit import audit
from dynamicfs.observability.log import error, log, warn

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool
    from dynamicfs.engine.store import ExtentInfo

MB = 1_000_000
INTENSITIES = {"low": 10 * MB, "medium": 50 * MB, "high": 200 * MB}
DEFAULT_INTENSITY = "medium"
FREQUENCIES = ("nightly", "weekly", "continuous")
PERIOD_DAYS = {"nightly": 1, "weekly": 7}
DEFAULT_HOUR = 2
IDLE, RUNNING, PAUSED, STOPPED = "idle", "running", "paused", "stopped"

BATCH = 16            # extents loaded at a time
QUIET = 0.5           # seconds without user I/O before the next extent
MAX_YIELD = 5.0       # longest wait for quiet before checking one extent anyway
IDLE_POLL = 30.0      # how often an idle scrubber looks at its schedule
DISK_RECHECK = 30.0   # how often disks are checked for being missing or mislabelled
SAVE_EVERY = 1.0      # seconds between cursor saves
DAY = 86400.0


class ScrubDaemonError(DynamicFSError):
    """A background scrub command that cannot be carried out as asked."""


# -- persisted state ---------------------------------------------------------------------
@dataclass
class Schedule:
    frequency: str
    intensity: str
    hour: int
    updated: float


@dataclass
class Cursor:
    """The row of `background_scrub`."""

    mode: str = IDLE
    intensity: str = DEFAULT_INTENSITY
    position: int = 0
    pass_started: float | None = None
    pass_checked: int = 0
    pass_bytes: int = 0
    pass_problems: int = 0
    pass_repaired: int = 0
    last_pass_started: float | None = None
    last_pass_finished: float | None = None
    last_pass_checked: int = 0
    last_pass_problems: int = 0
    passes: int = 0
    updated: float = 0.0


_CURSOR_COLUMNS = tuple(f.name for f in fields(Cursor))


def check_intensity(intensity: str) -> str:
    value = intensity.lower()
    if value not in INTENSITIES:
        raise ScrubDaemonError(f"unknown intensity {intensity!r}; use low (10 MB/s), "
                               "medium (50 MB/s) or high (200 MB/s)")
    return value


def load_schedule(pool: Pool) -> Schedule | None:
    with pool.meta.read() as conn:
        row = conn.execute("SELECT frequency, intensity, hour, updated FROM scrub_schedule "
                           "WHERE id = 1").fetchone()
    return None if row is None else Schedule(*row)


def save_schedule(pool: Pool, frequency: str, intensity: str,
                  hour: int = DEFAULT_HOUR) -> Schedule | None:
    """Store the schedule (frequency 'off' removes it)."""
    frequency = frequency.lower()
    if frequency != "off" and frequency not in FREQUENCIES:
        raise ScrubDaemonError(f"unknown frequency {frequency!r}; use nightly, weekly, "
                               "continuous or off")
    if not 0 <= hour <= 23:
        raise ScrubDaemonError(f"start hour {hour} is out of range: use 0 to 23 (local time)")
    intensity = check_intensity(intensity)
    with pool.meta.write() as conn:
        if frequency == "off":
            conn.execute("DELETE FROM scrub_schedule")
            return None
        schedule = Schedule(frequency, intensity, hour, time.time())
        conn.execute("INSERT OR REPLACE INTO scrub_schedule (id, frequency, intensity, hour, "
                     "updated) VALUES (1, ?, ?, ?, ?)", (frequency, intensity, hour,
                                                         schedule.updated))
    return schedule


def load_cursor(pool: Pool) -> Cursor:
    with pool.meta.read() as conn:
        row = conn.execute(f"SELECT {', '.join(_CURSOR_COLUMNS)} FROM background_scrub "
                           "WHERE id = 1").fetchone()
    return Cursor() if row is None else Cursor(*row)


def save_cursor(pool: Pool, cursor: Cursor) -> None:
    cursor.updated = time.time()
    values = [getattr(cursor, c) for c in _CURSOR_COLUMNS]
    with pool.meta.write() as conn:
        conn.execute(f"INSERT OR REPLACE INTO background_scrub (id, {', '.join(_CURSOR_COLUMNS)}) "
                     f"VALUES (1, {', '.join('?' * len(values))})", values)


# -- the schedule --------------------------------------------------------------------------
def _slot(hour: int, now: float, days_back: int = 0) -> float:
    """The local time `hour`:00 on the day of `now`, `days_back` days earlier."""
    lt = time.localtime(now)
    return time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday - days_back, hour, 0, 0, 0, 0, -1))


def due(schedule: Schedule | None, cursor: Cursor, now: float) -> bool:
    """Whether the schedule wants a new pass to start at `now`."""
    if schedule is None:
        return False
    if schedule.frequency == "continuous":
        return True
    slot = _slot(schedule.hour, now)
    if slot > now:
        slot = _slot(schedule.hour, now, 1)
    reference = cursor.last_pass_started or cursor.pass_started or schedule.updated
    return reference < slot - (PERIOD_DAYS[schedule.frequency] - 1) * DAY


def next_due(schedule: Schedule | None, cursor: Cursor, now: float) -> float | None:
    """When the schedule will next start a pass (now if due), None without a schedule."""
    if schedule is None:
        return None
    if due(schedule, cursor, now):
        return now
    for days in range(0, 9):
        at = _slot(schedule.hour, now, -days)
        if at > now and due(schedule, cursor, at):
            return at
    return None


# -- status ------------------------------------------------------------------------------
@dataclass
class Status:
    mode: str
    intensity: str
    rate_limit: int
    position: int
    pass_started: float | None
    checked: int
    remaining: int
    progress: float
    fragment_bytes: int
    problems: int
    repaired: int
    passes: int
    last_pass_started: float | None
    last_pass_finished: float | None
    last_pass_checked: int
    last_pass_problems: int
    schedule: Schedule | None
    next_scheduled: float | None
    yielding: bool
    note: str


# -- the thread ----------------------------------------------------------------------------
_attached: weakref.WeakKeyDictionary[Pool, BackgroundScrub] = weakref.WeakKeyDictionary()


def for_pool(pool: Pool) -> BackgroundScrub | None:
    """The background scrub of `pool` in this process: only the mount daemon has one."""
    return _attached.get(pool)


class BackgroundScrub:
    """The scrub thread of one pool; commands come from admin operations (any thread)."""

    def __init__(self, pool: Pool, *, quiet: float = QUIET, max_yield: float = MAX_YIELD,
                 idle_poll: float = IDLE_POLL, rates: dict[str, int] | None = None) -> None:
        self.pool = pool
        self.rates = dict(rates or INTENSITIES)
        self.quiet = quiet
        self.max_yield = max_yield
        self.idle_poll = idle_poll
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: list[ExtentInfo] = []
        self._next_slot = 0.0
        self._last_save = 0.0
        self._expected_ops = -1
        self._foreign_io = 0.0
        self._yielding = False
        self._bad_disks: dict[int, str] = {}
        self._disks_checked = 0.0
        self.cursor = Cursor()

    # -- life cycle
    def start(self) -> None:
        self.cursor = load_cursor(self.pool)
        _attached[self.pool] = self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="dynamicfs-scrub-bg",
                                        daemon=True)
        self._thread.start()
        if self.cursor.mode == RUNNING:
            log("background scrub resumes", position=self.cursor.position,
                intensity=self.cursor.intensity)

    def stop(self) -> None:
        """End the thread after the extent it is checking; the cursor is saved."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if _attached.get(self.pool) is self:
            del _attached[self.pool]

    # -- commands (from admin operations)
    def command(self, action: str, intensity: str | None = None) -> Status:
        chosen = check_intensity(intensity) if intensity else None
        with self._lock:
            c = self.cursor
            if action == "start":
                if c.pass_started is None:
                    self._begin_pass(chosen or self._default_intensity())
                elif chosen:
                    c.intensity = chosen
                c.mode = RUNNING
            elif action == "pause":
                if c.mode != RUNNING:
                    raise ScrubDaemonError(f"the background scrub is {c.mode}, not running; "
                                           "nothing to pause")
                c.mode = PAUSED
            elif action == "resume":
                if c.mode not in (PAUSED, STOPPED) or c.pass_started is None:
                    raise ScrubDaemonError(f"the background scrub is {c.mode} with no pass to "
                                           "resume; use 'scrub-daemon start'")
                c.mode = RUNNING
                if chosen:
                    c.intensity = chosen
            elif action == "stop":
                c.mode = STOPPED
            else:
                raise ScrubDaemonError(f"unknown action {action!r}; use start, status, pause, "
                                       "resume or stop")
            save_cursor(self.pool, c)
            log("background scrub " + action, mode=c.mode, intensity=c.intensity,
                position=c.position)
        self._wake.set()
        return self.status()

    def schedule_changed(self) -> None:
        self._wake.set()

    def status(self) -> Status:
        with self._lock:
            c = Cursor(**asdict(self.cursor))
            yielding = self._yielding
        schedule = load_schedule(self.pool)
        in_pass = c.pass_started is not None
        with self.pool.meta.read() as conn:
            remaining = int(conn.execute("SELECT count(*) FROM extents WHERE id > ?",
                                         (c.position,)).fetchone()[0]) if in_pass else 0
        total = c.pass_checked + remaining
        note = ""
        if c.mode == STOPPED and schedule is not None:
            note = "scheduled passes are suspended until 'scrub-daemon start'"
        elif c.mode == IDLE and schedule is None:
            note = "no schedule: start a pass with 'scrub-daemon start' or set 'scrub-schedule'"
        return Status(c.mode, c.intensity, self.rates[c.intensity], c.position, c.pass_started,
                      c.pass_checked, remaining,
                      round(c.pass_checked / total, 4) if in_pass and total else 0.0,
                      c.pass_bytes, c.pass_problems, c.pass_repaired, c.passes,
                      c.last_pass_started, c.last_pass_finished, c.last_pass_checked,
                      c.last_pass_problems, schedule,
                      next_due(schedule, c, time.time()) if c.mode == IDLE else None,
                      yielding and c.mode == RUNNING, note)

    # -- the loop
    def _default_intensity(self) -> str:
        schedule = load_schedule(self.pool)
        return schedule.intensity if schedule else self.cursor.intensity

    def _begin_pass(self, intensity: str) -> None:
        c = self.cursor
        c.intensity = intensity
        c.position = 0
        c.pass_started = time.time()
        c.pass_checked = c.pass_bytes = c.pass_problems = c.pass_repaired = 0
        self._queue = []
        log("background scrub pass starts", intensity=intensity)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.cursor.mode == RUNNING:
                    self._step()
                    continue
                with self._lock:
                    if self.cursor.mode == IDLE and due(load_schedule(self.pool), self.cursor,
                                                        time.time()):
                        self._begin_pass(self._default_intensity())
                        self.cursor.mode = RUNNING
                        save_cursor(self.pool, self.cursor)
                        continue
                self._wake.wait(self.idle_poll)
                self._wake.clear()
            except Exception as exc:  # keep the daemon's scrub alive; say what happened
                error("background scrub failed", reason=repr(exc))
                self._stopping.wait(10.0)
        with self._lock:
            try:
                save_cursor(self.pool, self.cursor)
            except Exception as exc:
                error("background scrub could not save its cursor", reason=repr(exc))

    def _step(self) -> None:
        """Check the next extent (after waiting for quiet and for the rate limit)."""
        if not self._queue:
            self._queue = scrub.load_extents(self.pool, self.cursor.position, BATCH)
            if not self._queue:
                self._finish_pass()
                return
        self._wait_for_quiet()
        self._wait_for_rate()
        # Under the lock: a command waits for the extent under way, so once `pause` or
        # `stop` has answered, the cursor does not move.
        with self._lock:
            if self._stopping.is_set() or self.cursor.mode != RUNNING:
                return
            info = self._queue.pop(0)
            began = time.monotonic()
            check = scrub.check_extent(self.pool, info, self._disk_problems())
            verdict = self._judge(check)
            self._expected_ops = self._disk_ops()
            # The bytes are charged from when the check began: reading time counts.
            rate = self.rates[self.cursor.intensity]
            self._next_slot = max(self._next_slot, began) + check.fragment_bytes / rate
            c = self.cursor
            c.position = info.id
            c.pass_checked += 1
            c.pass_bytes += check.fragment_bytes
            if verdict == scrub.REPAIRED:
                c.pass_repaired += 1
            elif verdict not in (scrub.HEALTHY, ""):
                c.pass_problems += 1
            if time.monotonic() - self._last_save >= SAVE_EVERY:
                save_cursor(self.pool, c)
                self._last_save = time.monotonic()

    def _finish_pass(self) -> None:
        with self._lock:
            c = self.cursor
            c.last_pass_started, c.last_pass_finished = c.pass_started, time.time()
            c.last_pass_checked, c.last_pass_problems = c.pass_checked, c.pass_problems
            c.passes += 1
            c.pass_started = None
            c.position = 0
            if c.mode == RUNNING:
                c.mode = IDLE
            save_cursor(self.pool, c)
            log("background scrub pass finished", checked=c.last_pass_checked,
                problems=c.last_pass_problems, repaired=c.pass_repaired,
                fragment_bytes=c.pass_bytes)

    # -- manners
    def _disk_ops(self) -> int:
        return sum(d.reads + d.writes for d in list(self.pool.disks.values()))

    def _last_user_io(self) -> float:
        ops = self._disk_ops()
        if ops != self._expected_ops:
            if self._expected_ops >= 0:
                self._foreign_io = time.monotonic()
            self._expected_ops = ops
        return max(self._foreign_io, metrics.last_fuse_request())

    def _wait_for_quiet(self) -> None:
        deadline = time.monotonic() + self.max_yield
        while not self._stopping.is_set() and self.cursor.mode == RUNNING:
            now = time.monotonic()
            quiet_for = now - self._last_user_io()
            if quiet_for >= self.quiet or now >= deadline:
                break
            self._yielding = True
            self._wake.wait(min(self.quiet - quiet_for, deadline - now))
            self._wake.clear()
        self._yielding = False

    def _wait_for_rate(self) -> None:
        while not self._stopping.is_set() and self.cursor.mode == RUNNING:
            left = self._next_slot - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _disk_problems(self) -> dict[int, str]:
        now = time.monotonic()
        if now - self._disks_checked >= DISK_RECHECK:
            self._bad_disks = {d.id: d.problem for d in scrub.check_disks(self.pool)}
            self._disks_checked = now
        return self._bad_disks

    # -- verdicts
    def _judge(self, check: scrub.ExtentCheck) -> str:
        """The verdict on one extent after repairing it if it can; records problems."""
        if check.state == scrub.HEALTHY:
            return scrub.HEALTHY
        current = scrub.load_extent(self.pool, check.extent_id)
        if current is None:
            return ""  # freed while it was read
        if frozenset(r.id for r in current.fragments) != check.fragment_ids:
            check = scrub.check_extent(self.pool, current, self._disk_problems())
            if check.state == scrub.HEALTHY:
                return scrub.HEALTHY
        verdict, detail = check.state, check.detail
        if verdict == scrub.UNDER_REDUNDANT:
            blockers = scrub.repair_blockers(self.pool)
            if blockers:
                detail = f"{detail}; {scrub.blocker_note(blockers)}"
            else:
                verdict, detail = self._repair(check)
        if verdict == scrub.HEALTHY:
            return verdict
        now = time.time()
        with self.pool.meta.write() as conn:
            conn.execute("INSERT OR REPLACE INTO scrub_problems (extent_id, state, detail, "
                         "found) VALUES (?, ?, ?, ?)", (check.extent_id, verdict, detail, now))
            if verdict != scrub.REPAIRED:
                conn.execute("INSERT OR IGNORE INTO repair_queue (extent_id, reason, queued) "
                             "VALUES (?, ?, ?)",
                             (check.extent_id, f"background scrub: {detail}"[:500], now))
        report = error if verdict == scrub.UNREADABLE else warn
        report("background scrub found a problem", extent=check.extent_id, verdict=verdict,
               detail=detail)
        return verdict

    def _repair(self, check: scrub.ExtentCheck) -> tuple[str, str]:
        verdict, detail = scrub.UNDER_REDUNDANT, check.detail
        try:
            outcome = self.pool.store.rebuild(check.extent_id)
        except UnreadableError as exc:
            verdict, outcome = scrub.UNREADABLE, "failed"
            detail = f"{check.detail}; repair failed: {exc}"
        except (DynamicFSError, OSError) as exc:
            outcome = "failed"
            detail = f"{check.detail}; repair failed: {exc}"
        else:
            if outcome == "repaired":
                verdict = scrub.REPAIRED
            elif outcome in ("healthy", "stale"):  # stale: rewritten or freed meanwhile
                verdict, detail = scrub.HEALTHY, ""
            else:
                detail = f"{check.detail}; repair {outcome}: not enough healthy disks with room"
        audit("repair", pool=self.pool, extent=check.extent_id, outcome=outcome,
              found=check.detail, by="background scrub")
        return verdict, detail
