"""The audit trail: who changed the pool, when, how, and what came of it.

Every admin operation that changes the pool and every repair is recorded twice: one
JSON line in POOL/logs/audit.log (for people and log shippers; owner-only) and one
row in the `events` table (kept with the metadata, so it survives losing the pool
directory's logs and travels with metadata copies). Each record names the actor: the
uid and user name of whoever asked (offline: this process; through the control
socket: the peer's credentials, read with SO_PEERCRED), the process id and the path
the request came by (`cli` in-process, `control` through the mount daemon, `daemon`
for work the daemon starts on its own, such as the background scrub).

The actor is a context variable: the control server and the offline runner set it
around each request (`actor_scope`), so code deep below (a rebuild inside an admin
operation) can call `audit(event, pool=pool, ...)` without passing it along.

Auditing never breaks what it records: a failure to write the trail is logged as a
warning and swallowed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dynamicfs.observability.log import LOG_DIR, current_request, log, timestamp, warn

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

AUDIT_FILE = "audit.log"
# Prefix of the `events.kind` of audit records, so they read apart from other events.
KIND_PREFIX = "audit:"


@dataclass(frozen=True)
class Actor:
    """Who a request came from."""

    uid: int
    user: str
    pid: int | None
    via: str


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def local_actor(via: str = "cli") -> Actor:
    """This process, acting for the user who runs it."""
    uid = os.getuid()
    return Actor(uid, user_name(uid), os.getpid(), via)


def peer_actor(conn: socket.socket) -> Actor:
    """The process at the other end of a unix socket, from the kernel's credentials."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", raw)
    except OSError:
        return Actor(-1, "unknown", None, "control")
    return Actor(uid, user_name(uid), pid, "control")


_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("dynamicfs_actor",
                                                                    default=None)


def current_actor() -> Actor:
    """The actor of the request being served, or the process itself acting on its own."""
    return _actor.get() or local_actor("daemon")


@contextlib.contextmanager
def actor_scope(actor: Actor) -> Iterator[Actor]:
    token = _actor.set(actor)
    try:
        yield actor
    finally:
        _actor.reset(token)


def audit_path(pool_dir: Path) -> Path:
    return Path(pool_dir) / LOG_DIR / AUDIT_FILE


def audit(event: str, *, pool: Pool, **fields: object) -> dict[str, object]:
    """Record `event` (e.g. 'admin', 'repair') with `fields`; returns the record written.

    Changes to the `events` table join the pool's current metadata transaction: they
    become durable with the change they describe (offline at the end of the command,
    in the daemon at the next group commit).
    """
    now = time.time()
    actor = current_actor()
    record: dict[str, object] = {"time": timestamp(now), "event": event,
                                 "pool": str(pool.path), **asdict(actor)}
    request = current_request()
    if request is not None:
        record["request"] = request
    record.update(fields)
    try:
        _append(audit_path(pool.path), json.dumps(record, default=str))
    except OSError as exc:
        warn("audit log not written", reason=exc.strerror, audit_event=event)
    try:
        detail = {k: v for k, v in record.items() if k not in ("time", "event", "pool")}
        pool.record_event(KIND_PREFIX + event, detail)
    except Exception as exc:  # a broken metadata store must not hide the action itself
        warn("audit event not stored", reason=repr(exc), audit_event=event)
    shown: dict[str, object] = {k: v for k, v in fields.items()
                                if k not in ("event", "level")}
    shown.update(audit_event=event, user=actor.user, uid=actor.uid)
    log("audit", logging.INFO, **shown)
    return record


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")  # one write: lines from threads never interleave
    finally:
        os.close(fd)


def read_audit(pool_dir: Path) -> list[dict[str, object]]:
    """Every record of POOL/logs/audit.log, oldest first (unparseable lines skipped)."""
    try:
        text = audit_path(pool_dir).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(dict(json.loads(line)))
    return out
