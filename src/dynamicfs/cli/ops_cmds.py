"""Operations commands: metrics, metrics-server, health, audit-log, scrub-daemon,
scrub-schedule."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import click

from dynamicfs.cli.common import flexible, print_json, print_table, run_op
from dynamicfs.control import client
from dynamicfs.engine.pool import Pool, check_pool_dir, directory_writable
from dynamicfs.errors import PoolBusyError
from dynamicfs.maintenance.background import FREQUENCIES, INTENSITIES
from dynamicfs.observability import log as logmod
from dynamicfs.observability import metrics
from dynamicfs.sizes import format_size

SCRUB_ACTIONS = ("start", "status", "pause", "resume", "stop")


def when(ts: float | None) -> str:
    """'2026-01-02 03:04:05 (3h ago)' in local time; 'never' for None."""
    if ts is None:
        return "never"
    delta = time.time() - ts
    ago = abs(delta)
    if ago < 120:
        span = f"{ago:.0f}s"
    elif ago < 7200:
        span = f"{ago / 60:.0f}min"
    elif ago < 172800:
        span = f"{ago / 3600:.0f}h"
    else:
        span = f"{ago / 86400:.0f} days"
    rel = f"{span} ago" if delta >= 0 else f"in {span}"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({rel})"


# -- health ----------------------------------------------------------------------------
def _scrub_line(s: dict[str, Any]) -> str:
    if s["in_progress"]:
        return (f"{s['kind']} scrub: {s['progress'] * 100:.1f}% of the pass done "
                f"({s['checked']} extents checked, {s['remaining']} to go), started "
                f"{when(s['started'])}")
    found = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in s["problems"].items() if n)
    return (f"{s['kind']} scrub: last pass finished {when(s['finished'])}, "
            f"{s['checked']} extents checked, {found or 'no problems'}")


def health_text(r: dict[str, Any]) -> None:
    click.echo(f"pool {r['pool']} (uuid {r['uuid']}): {r['status'].upper()}")
    for line in r["problems"]:
        click.echo(f"  problem: {line}")
    for line in r["warnings"]:
        click.echo(f"  warning: {line}")
    if r["disks"]:
        print_table(None, ["disk", "path", "state", "errors r/w/sum", "capacity", "used",
                           "reason"],
                    [[d["id"], d["path"], d["state"],
                      f"{d['read_errors']}/{d['write_errors']}/{d['checksum_errors']}",
                      format_size(d["capacity"]), format_size(d["used"]), d["reason"]]
                     for d in r["disks"]])
    e = r["extents"]
    click.echo(f"extents: {e['total']} ({e['healthy']} healthy, {e['under_redundant']} "
               f"under-redundant, {e['unreadable']} unreadable)")
    for state, paths in r["at_risk"].items():
        if paths:
            click.echo(f"files with {state.replace('_', '-')} extents (first {len(paths)}):")
            for path in paths:
                click.echo(f"  {path}")
    click.echo(f"repair queue: {r['repair_queue']} extents")
    for key in ("last_scrub", "background_scrub"):
        if r[key] is not None:
            click.echo(_scrub_line(r[key]))
    if r["last_scrub"] is None and r["background_scrub"] is None:
        click.echo("scrub: never")
    copies = r["metadata_copies"]
    recorded = r["metadata_generation"]
    if recorded or copies:
        held = ", ".join(f"disk {c['disk']}: generation {c['newest']}" for c in copies)
        head = (f"generation {recorded['generation']} written {when(recorded['copied'])}"
                if recorded else "none recorded")
        click.echo(f"metadata copies: {head}; {held or 'no disk holds one'}")


# -- scrub daemon ----------------------------------------------------------------------
def scrub_status_text(s: dict[str, Any]) -> None:
    click.echo(f"background scrub: {s['mode']}, intensity {s['intensity']} (up to "
               f"{s['rate_limit'] // 1_000_000} MB/s)"
               + (", yielding to user I/O" if s["yielding"] else ""))
    if s["pass_started"] is not None:
        click.echo(f"pass started {when(s['pass_started'])}: {s['progress'] * 100:.1f}% done, "
                   f"{s['checked']} extents checked, {s['remaining']} to go, "
                   f"{format_size(s['fragment_bytes'])} read, {s['problems']} problems, "
                   f"{s['repaired']} repaired")
    if s["passes"]:
        click.echo(f"last complete pass: started {when(s['last_pass_started'])}, finished "
                   f"{when(s['last_pass_finished'])}, {s['last_pass_checked']} extents, "
                   f"{s['last_pass_problems']} problems ({s['passes']} passes in all)")
    sched = s["schedule"]
    if sched:
        nxt = f"; next pass {when(s['next_scheduled'])}" if s["next_scheduled"] else ""
        click.echo(f"schedule: {sched['frequency']} at {sched['hour']:02d}:00, intensity "
                   f"{sched['intensity']}{nxt}")
    else:
        click.echo("schedule: none")
    if s["note"]:
        click.echo(s["note"])


# -- metrics server --------------------------------------------------------------------
def _serve_until_stopped(server: metrics.MetricsServer, what: str) -> None:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    click.echo(f"serving {what} at {server.url}/metrics and {server.url}/health; "
               "stop with Ctrl-C", err=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()


def metrics_server(pool: str, address: str) -> None:
    pool_dir = check_pool_dir(pool)
    try:
        opened = Pool.open(pool_dir, read_only=not directory_writable(pool_dir))
    except PoolBusyError:
        if not client.socket_path(pool_dir).exists():
            raise
        server = metrics.MetricsServer(
            address, lambda: str(client.call(pool_dir, "metrics", {})),
            lambda: dict(client.call(pool_dir, "health", {})))
        _serve_until_stopped(server, f"pool {pool_dir} (through its mount daemon)")
        return
    with opened:
        if not opened.read_only:
            logmod.configure_for_pool(pool_dir)
        server = metrics.serve_metrics(opened, address)
        _serve_until_stopped(server, f"pool {pool_dir} (held open: it cannot be mounted "
                                     "meanwhile)")


def register(cli: click.Group) -> None:
    @cli.command("metrics")
    @flexible("pool")
    def metrics_cmd(pool: str) -> None:
        """Print a snapshot of POOL's metrics (Prometheus text format)."""
        click.echo(run_op(pool, "metrics", show_progress=False), nl=False)

    @cli.command("metrics-server")
    @flexible("pool")
    @click.option("--port", type=click.IntRange(0, 65535), default=None,
                  help=f"TCP port (0: any free port)  [default: {metrics.DEFAULT_PORT}]")
    @click.option("--address", default="127.0.0.1", show_default=True, metavar="HOST[:PORT]",
                  help="address to listen on, with the port or without, as mount's "
                       "--metrics-address; 0.0.0.0 exposes the metrics to the network")
    def metrics_server_cmd(pool: str, port: int | None, address: str) -> None:
        """Serve POOL's /metrics (Prometheus) and /health (JSON) over HTTP until stopped.

        When POOL is mounted, every request is answered by its mount daemon; otherwise
        the pool is held open (and cannot be mounted) while this runs.
        """
        metrics_server(pool, metrics.listen_address(address, port))

    @cli.command("health")
    @flexible("pool")
    @click.option("--limit", type=click.IntRange(0, 10000), default=20, show_default=True,
                  help="files listed per kind of risk")
    @click.option("--json", "as_json", is_flag=True)
    def health_cmd(pool: str, limit: int, as_json: bool) -> None:
        """Check POOL: exit 0 when healthy, 1 when degraded, 2 when data is unreadable."""
        report = run_op(pool, "health", {"limit": limit}, show_progress=False)
        if as_json:
            print_json(report)
        else:
            health_text(report)
        if report["exit_code"]:
            raise click.exceptions.Exit(int(report["exit_code"]))

    @cli.command("audit-log")
    @flexible("pool")
    @click.option("--limit", type=click.IntRange(1, 100000), default=50, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    def audit_log_cmd(pool: str, limit: int, as_json: bool) -> None:
        """Show the newest audit records of POOL: who changed what, when, with what result."""
        rows = run_op(pool, "audit-log", {"limit": limit}, show_progress=False)
        if as_json:
            print_json(rows)
            return
        print_table(None, ["time", "user", "via", "event", "what", "outcome"],
                    [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])),
                      f"{r.get('user')} ({r.get('uid')})", r.get("via", ""), r["event"],
                      r.get("op") or (f"extent {r['extent']}" if "extent" in r else ""),
                      r.get("outcome", "")] for r in rows])

    @cli.command("scrub-daemon")
    @click.argument("action", type=click.Choice(SCRUB_ACTIONS))
    @flexible("pool")
    @click.option("--intensity", type=click.Choice(tuple(INTENSITIES)),
                  help="low (10 MB/s), medium (50 MB/s) or high (200 MB/s) of disk reads")
    @click.option("--json", "as_json", is_flag=True)
    def scrub_daemon_cmd(action: str, pool: str, intensity: str | None, as_json: bool) -> None:
        """Steer the background scrub of mounted POOL: start, status, pause, resume, stop."""
        if action == "status":
            if intensity:
                raise click.UsageError("--intensity goes with start or resume, not status")
            status = run_op(pool, "scrub-daemon-status", show_progress=False)
        else:
            status = run_op(pool, "scrub-daemon", {"action": action, "intensity": intensity},
                            show_progress=False)
        if as_json:
            print_json(status)
        else:
            scrub_status_text(status)

    @cli.command("scrub-schedule")
    @flexible("pool")
    @click.option("--frequency", required=True, type=click.Choice((*FREQUENCIES, "off")),
                  help="when the mount daemon scrubs in the background (off: never)")
    @click.option("--intensity", type=click.Choice(tuple(INTENSITIES)), default="medium",
                  show_default=True, help="low (10 MB/s), medium (50 MB/s), high (200 MB/s)")
    @click.option("--hour", type=click.IntRange(0, 23), default=2, show_default=True,
                  help="local hour nightly and weekly passes start at")
    @click.option("--json", "as_json", is_flag=True)
    def scrub_schedule_cmd(pool: str, frequency: str, intensity: str, hour: int,
                           as_json: bool) -> None:
        """Store when POOL's mount daemon scrubs in the background (works unmounted too)."""
        result = run_op(pool, "scrub-schedule", {"frequency": frequency, "intensity": intensity,
                                                 "hour": hour}, show_progress=False)
        if as_json:
            print_json(result)
            return
        if result["schedule"] is None:
            click.echo("background scrub schedule removed")
            return
        s = result["schedule"]
        where = "" if result["mounted"] else " (the pool is not mounted: passes run while it is)"
        nxt = f"; next pass {when(result['next_scheduled'])}" if result["next_scheduled"] else ""
        at = "" if s["frequency"] == "continuous" else f" at {s['hour']:02d}:00"
        click.echo(f"background scrub: {s['frequency']}{at}, intensity {s['intensity']}"
                   f"{nxt}{where}")
