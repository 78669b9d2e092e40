"""A disk that fails on purpose: a DirectoryDisk wrapper that injects I/O faults by rule.

Tests put a FaultyDisk in `pool.backends[disk_id]` to run the real engine against a
disk that returns EIO, runs out of space, writes half a fragment, flips a bit on the
way back, or stops persisting anything (a crash). Nothing above the disk layer is
mocked: the engine sees the same methods as DirectoryDisk and real files underneath.

A rule names an operation, a fault and when it fires: the calls of that operation are
counted per rule, the first `after` pass through, then the next `times` fail (all of
them when `times` is None). "Fail the 3rd write" is FaultRule("write", "eio",
after=2, times=1).

operations  read (read_fragment), write (write_fragment), sync (sync and
            sync_filesystem), delete (delete_fragment)
faults      eio       raise OSError(EIO), nothing done
            enospc    raise OSError(ENOSPC), nothing written (write only)
            short     write the header and half the payload, then raise EIO (write only)
            bitflip   return the bytes with one bit flipped (read only; `at` picks the
                      byte, default the middle of the file)
            crash     from then on writes, deletes and syncs report success but reach
                      nothing: the disk as a process saw it just before a power cut
            slow      wait `at` milliseconds (default 2000), then read as usual (read
                      only): a disk that answers late

The same rules can come from a spec string, e.g. in the environment variable
DYNAMICFS_FAULTS, so a mount daemon, or a command that opens the pool itself, can run on
faulty disks:

    disk=2:write:eio:after=3;disk=4:read:bitflip:times=1

`wrap_backends(pool, spec)` applies such a spec to an open pool.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynamicfs.disks.directory import DirectoryDisk, FragmentRef, ProbeResult, SegmentInfo
from dynamicfs.disks.label import Label

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

ENV_VAR = "DYNAMICFS_FAULTS"
OPERATIONS = ("read", "write", "sync", "delete")
FAULTS = ("eio", "enospc", "short", "bitflip", "crash", "slow")
SLOW_DEFAULT_MS = 2000
# Where a write that never reached a crashed disk claims to be: a segment that does not
# exist (segment names are fragment ids, and this one is never used).
LOST_LOCATION = (0, 0)
_ALLOWED = {
    "eio": {"read", "write", "sync", "delete"},
    "enospc": {"write"},
    "short": {"write"},
    "bitflip": {"read"},
    "crash": {"write"},
    "slow": {"read"},
}


class FaultSpecError(ValueError):
    """A fault spec string is malformed; str() says where."""


@dataclass
class FaultRule:
    op: str
    fault: str
    after: int = 0
    times: int | None = None
    at: int | None = None  # bitflip: byte offset in the fragment; slow: milliseconds

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            raise FaultSpecError(f"unknown operation {self.op!r}: use one of {OPERATIONS}")
        if self.fault not in FAULTS:
            raise FaultSpecError(f"unknown fault {self.fault!r}: use one of {FAULTS}")
        if self.op not in _ALLOWED[self.fault]:
            raise FaultSpecError(f"fault {self.fault!r} does not apply to {self.op!r}")
        if self.after < 0 or (self.times is not None and self.times < 0):
            raise FaultSpecError("after and times must not be negative")


class _Armed:
    """A rule and its counters."""

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.calls = 0
        self.fired = 0

    def hit(self) -> bool:
        """Count one call; True when this call must fail."""
        self.calls += 1
        if self.calls <= self.rule.after:
            return False
        if self.rule.times is not None and self.fired >= self.rule.times:
            return False
        self.fired += 1
        return True


class FaultyDisk:
    """DirectoryDisk's interface over a real DirectoryDisk, failing where the rules say."""

    def __init__(self, inner: DirectoryDisk, rules: Iterable[FaultRule] = (),
                 *, own_device: bool = False) -> None:
        self.inner = inner
        self.root = inner.root
        self.segment_root = inner.segment_root
        self.legacy_root = inner.legacy_root
        # own_device: report a device id of its own, so the engine syncs this disk on
        # its own instead of through a syncfs() of a filesystem it shares with others.
        self.own_device = own_device
        self._lock = threading.Lock()
        self._armed: list[_Armed] = []
        self.crashed = False
        self.calls: collections.Counter[str] = collections.Counter()  # per operation
        self.injected: list[tuple[str, str, int | None]] = []  # (op, fault, fragment id)
        for rule in rules:
            self.add(rule)

    def __repr__(self) -> str:
        return f"FaultyDisk({self.inner!r}, {[a.rule for a in self._armed]!r})"

    # -- rules ----------------------------------------------------------------
    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._armed.append(_Armed(rule))

    def heal(self) -> None:
        """Drop every rule; a crashed disk stays crashed."""
        with self._lock:
            self._armed = []

    def _fault(self, op: str, fragment_id: int | None) -> FaultRule | None:
        """The rule that fails this call, if any (every matching rule counts the call)."""
        with self._lock:
            self.calls[op] += 1
            firing = None
            for armed in self._armed:
                if armed.rule.op == op and armed.hit() and firing is None:
                    firing = armed.rule
            if firing is not None:
                self.injected.append((op, firing.fault, fragment_id))
                if firing.fault == "crash":
                    self.crashed = True
            return firing

    # -- fragments -----------------------------------------------------------
    def write_fragment(self, fragment_id: int, header: bytes, payload: bytes | memoryview,
                       *, name_segment: Callable[[], int] | None = None,
                       direct: bool = True) -> tuple[int, int]:
        rule = self._fault("write", fragment_id)
        if self.crashed:
            return LOST_LOCATION
        if rule is None:
            return self.inner.write_fragment(fragment_id, header, payload,
                                             name_segment=name_segment, direct=direct)
        if rule.fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if rule.fault == "short":
            self.inner.write_fragment(fragment_id, header, memoryview(payload)[: len(payload) // 2])
            self.inner.close()  # a torn record ends its segment, as a failed write does
            raise _eio(f"short write of fragment {fragment_id:x}")
        raise _eio(f"write of fragment {fragment_id:x}")

    def write_fragments(self, records: Sequence[tuple[int, bytes, bytes | memoryview]],
                        where: list[tuple[int, int]], *,
                        name_segment: Callable[[], int] | None = None,
                        direct: bool = True) -> None:
        """One write_fragment() each, so that every rule counts fragments as before."""
        for fid, header, payload in records:
            where.append(self.write_fragment(fid, header, payload, name_segment=name_segment,
                                             direct=direct))

    def read_fragment(self, ref: FragmentRef) -> bytes | memoryview:
        rule = self._fault("read", ref.id)
        if rule is not None and rule.fault == "eio":
            raise _eio(f"read of fragment {ref.id:x}")
        if rule is not None and rule.fault == "slow":
            time.sleep((SLOW_DEFAULT_MS if rule.at is None else rule.at) / 1000)
        raw = self.inner.read_fragment(ref)
        if rule is not None and rule.fault == "bitflip" and raw:
            at = len(raw) // 2 if rule.at is None else min(rule.at, len(raw) - 1)
            flipped = bytearray(raw)
            flipped[at] ^= 0x01
            raw = bytes(flipped)
        return raw

    def delete_fragment(self, ref: FragmentRef) -> None:
        rule = self._fault("delete", ref.id)
        if self.crashed:
            return
        if rule is not None:
            raise _eio(f"delete of fragment {ref.id:x}")
        self.inner.delete_fragment(ref)

    def fragment_exists(self, ref: FragmentRef) -> bool:
        return self.inner.fragment_exists(ref)

    def list_fragments(self) -> Iterator[tuple[FragmentRef, float]]:
        return self.inner.list_fragments()

    def segments(self) -> list[SegmentInfo]:
        return self.inner.segments()

    def records(self, segment: int) -> Iterator[FragmentRef]:
        return self.inner.records(segment)

    def remove_segment(self, segment: int) -> bool:
        return self.inner.remove_segment(segment)

    def segment_path(self, segment: int) -> Path:
        return self.inner.segment_path(segment)

    @property
    def active_segment(self) -> int | None:
        return self.inner.active_segment

    def close(self) -> None:
        self.inner.close()

    def sync(self, refs: Iterable[FragmentRef]) -> None:
        refs = list(refs)
        if self._fault("sync", None) is not None:
            raise _eio("sync")
        if not self.crashed:
            self.inner.sync(refs)

    def sync_filesystem(self) -> None:
        if self._fault("sync", None) is not None:
            raise _eio("syncfs")
        if not self.crashed:
            self.inner.sync_filesystem()

    # -- the disk as a whole ---------------------------------------------------
    def device_id(self) -> int:
        if self.own_device:
            return -(id(self) & 0x7FFFFFFF) - 1
        return self.inner.device_id()

    def free_bytes(self) -> int:
        return self.inner.free_bytes()

    def read_label(self) -> Label:
        return self.inner.read_label()

    def probe(self, pool_uuid: str, disk_uuid: str) -> ProbeResult:
        return self.inner.probe(pool_uuid, disk_uuid)


def _eio(what: str) -> OSError:
    return OSError(errno.EIO, f"injected I/O error: {what}")


# -- spec strings -------------------------------------------------------------------
def parse_spec(spec: str) -> dict[int | None, list[FaultRule]]:
    """'disk=2:write:eio:after=3;read:bitflip' -> rules per disk id (None: every disk)."""
    out: dict[int | None, list[FaultRule]] = {}
    for part in (p.strip() for p in spec.replace(",", ";").split(";")):
        if not part:
            continue
        disk: int | None = None
        words: list[str] = []
        options: dict[str, int] = {}
        for field in part.split(":"):
            key, eq, value = field.partition("=")
            if not eq:
                words.append(field.strip().lower())
                continue
            try:
                number = int(value)
            except ValueError:
                raise FaultSpecError(f"{part!r}: {key}= needs a whole number") from None
            key = key.strip().lower()
            if key == "disk":
                disk = number
            elif key in ("after", "times", "at"):
                options[key] = number
            else:
                raise FaultSpecError(f"{part!r}: unknown option {key!r} "
                                     "(use disk=, after=, times=, at=)")
        if len(words) != 2:
            raise FaultSpecError(f"{part!r}: expected [disk=N:]operation:fault[:after=N]"
                                 "[:times=N][:at=N]")
        out.setdefault(disk, []).append(FaultRule(words[0], words[1], **options))
    return out


def wrap_backends(pool: Pool, spec: str | None = None) -> dict[int, FaultyDisk]:
    """Wrap the pool's disks named by `spec` (default: $DYNAMICFS_FAULTS) in FaultyDisks.

    A rule without disk= applies to every disk. Returns the wrappers by disk id.
    Wrappers stay through pool.reload_disks(); disks added later get plain backends.
    """
    text = os.environ.get(ENV_VAR, "") if spec is None else spec
    rules = parse_spec(text)
    unknown = sorted(d for d in rules if d is not None and d not in pool.backends)
    if unknown:
        raise FaultSpecError(f"fault spec names unknown disk(s) {unknown}; "
                             f"the pool has {sorted(pool.backends)}")
    wrapped: dict[int, FaultyDisk] = {}
    for disk_id, backend in list(pool.backends.items()):
        mine = rules.get(None, []) + rules.get(disk_id, [])
        if not mine:
            continue
        if isinstance(backend, FaultyDisk):
            for rule in mine:
                backend.add(rule)
            wrapped[disk_id] = backend
            continue
        faulty = FaultyDisk(backend, mine)
        pool.backends[disk_id] = faulty  # type: ignore[assignment]
        wrapped[disk_id] = faulty
    return wrapped
