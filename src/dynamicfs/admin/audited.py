"""Running an admin operation with its audit record: the one place both paths go through.

The control server (operations sent to the mount daemon) and the offline runner
(cli.common.run_op on a pool that is not mounted) call `run_audited` with the actor
the request came from. Every operation that changes the pool (`writes=True`) leaves an
`admin` audit record, whether it succeeded, was refused or crashed; read-only
operations (status, list-disks, metrics, health) leave none, so that monitoring does
not drown the trail, and neither does anything run on a pool opened read-only (it
changes nothing, and there is nowhere to write). Each request gets a request id, which
tags its log lines and its audit record.
"""

from __future__ import annotations

import time
from typing import Any

from dynamicfs.admin import registry
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.observability import log as logmod
from dynamicfs.observability.audit import Actor, actor_scope, audit, local_actor


def run_audited(pool: Pool, name: str, args: dict[str, Any], actor: Actor,
                progress: registry.Progress | None = None) -> Any:
    audited = registry.get(name).writes and not pool.read_only
    with actor_scope(actor), logmod.request_scope():
        start = time.monotonic()
        try:
            result = registry.run(pool, name, args, progress)
        except DynamicFSError as exc:
            if audited:
                audit("admin", pool=pool, op=name, args=args, outcome="refused",
                      error=str(exc), seconds=round(time.monotonic() - start, 3))
            raise
        except BaseException as exc:
            if audited:
                audit("admin", pool=pool, op=name, args=args, outcome="failed",
                      error=repr(exc), seconds=round(time.monotonic() - start, 3))
            raise
        if audited:
            audit("admin", pool=pool, op=name, args=args, outcome="ok",
                  seconds=round(time.monotonic() - start, 3))
        return result


def run_offline(pool: Pool, name: str, args: dict[str, Any],
                progress: registry.Progress | None = None) -> Any:
    """An operation in this process, on a pool it opened: logs to the pool, audited. A
    pool opened read-only has nowhere to log: what matters is in the operation's
    report."""
    logfile = logmod.log_path(pool.path)
    if pool.read_only:
        logmod.configure(pool=str(pool.path))
    elif not logmod.logs_to(logfile):
        try:
            logmod.configure_for_pool(pool.path)
        except OSError:  # the log cannot be written: the operation itself will say why
            logmod.configure(pool=str(pool.path))
    return run_audited(pool, name, args, local_actor("cli"), progress)
