"""Disk commands: add-disk, list-disks, set-disk-health, fail-disk, probe-disks, remove-disk."""

from __future__ import annotations

import os
from typing import Any

import click

from dynamicfs.cli.common import disk_ref, flexible, print_json, print_table, run_op
from dynamicfs.fuse import daemon
from dynamicfs.sizes import format_size, parse_size


def _show_disk(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(row)
        return
    reason = f" ({row['reason']})" if row["reason"] else ""
    click.echo(f"disk {row['id']} {row['path']} is {row['state']}{reason}")


def register(cli: click.Group) -> None:
    @cli.command("add-disk")
    @flexible("pool", "disk")
    @click.option("--capacity", help="cap what the pool may store there, e.g. 500G "
                                     "(default: the free space of its filesystem)")
    @click.option("--tier", default="default", show_default=True, help="tier name, e.g. fast")
    @click.option("--json", "as_json", is_flag=True)
    def add_disk(pool: str, disk: str, capacity: str | None, tier: str, as_json: bool) -> None:
        """Add directory DISK to POOL (works while the pool is mounted)."""
        cap = parse_size(capacity) if capacity is not None else None
        path = os.path.abspath(disk)
        daemon.check_outside_own_mount(pool, path)
        row = run_op(pool, "add-disk", {"path": path, "capacity": cap, "tier": tier})
        if as_json:
            print_json(row)
        else:
            click.echo(f"added disk {row['id']} {row['path']} ({format_size(row['capacity'])}, "
                       f"tier {row['tier']})")
        if row["shares_filesystem_with"] and not as_json:
            others = ", ".join(str(d) for d in row["shares_filesystem_with"])
            click.echo(f"note: disk {row['id']} is on the same filesystem as disk(s) {others}: "
                       "they share its free space, and a failure of that device takes them "
                       "all at once; put disks on separate devices for redundancy")

    @cli.command("list-disks")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def list_disks(pool: str, as_json: bool) -> None:
        """List the disks of POOL."""
        rows = run_op(pool, "list-disks")
        if as_json:
            print_json(rows)
            return
        print_table(None, ["id", "path", "tier", "state", "capacity", "used", "fragments",
                           "errors r/w/sum", "reason"],
                    [[r["id"], r["path"], r["tier"], r["state"], format_size(r["capacity"]),
                      format_size(r["used"]), r["fragments"],
                      f"{r['read_errors']}/{r['write_errors']}/{r['checksum_errors']}",
                      r["reason"]] for r in rows])

    @cli.command("set-disk-health")
    @flexible("pool", "disk", "state")
    @click.option("--reason", default="set by operator", show_default=True,
                  help="why, shown by list-disks")
    @click.option("--force", is_flag=True,
                  help="fail the disk even if some files become unreadable")
    @click.option("--json", "as_json", is_flag=True)
    def set_disk_health(pool: str, disk: str, state: str, reason: str, force: bool,
                        as_json: bool) -> None:
        """Set the health STATE of DISK (id, path or UUID): healthy, suspect, degraded,
        draining or failed."""
        row = run_op(pool, "set-disk-health", {"ref": disk_ref(disk), "state": state,
                                               "reason": reason, "force": force})
        _show_disk(row, as_json)

    @cli.command("fail-disk")
    @flexible("pool", "disk")
    @click.option("--force", is_flag=True,
                  help="fail the disk even if some files become unreadable")
    @click.option("--json", "as_json", is_flag=True)
    def fail_disk(pool: str, disk: str, force: bool, as_json: bool) -> None:
        """Mark DISK failed: nothing is read from or written to it any more."""
        row = run_op(pool, "fail-disk", {"ref": disk_ref(disk), "force": force})
        _show_disk(row, as_json)

    @cli.command("probe-disks")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def probe_disks(pool: str, as_json: bool) -> None:
        """Check every disk (present, labelled, readable and writable); update health."""
        rows = run_op(pool, "probe-disks")
        if as_json:
            print_json(rows)
            return
        print_table(None, ["id", "path", "before", "after", "probe"],
                    [[r["id"], r["path"], r["before"], r["after"], r["reason"]] for r in rows])

    @cli.command("remove-disk")
    @flexible("pool", "disk")
    @click.option("--force", is_flag=True,
                  help="remove it even if some files are left below their policy's minimum")
    @click.option("--json", "as_json", is_flag=True)
    def remove_disk(pool: str, disk: str, force: bool, as_json: bool) -> None:
        """Move every fragment off DISK to the other disks, then remove it from POOL."""
        report = run_op(pool, "remove-disk", {"ref": disk_ref(disk), "force": force},
                        progress_label="draining", show_progress=not as_json,
                        if_interrupted=f"disk {disk} stays draining if the drain had begun "
                        f"(see 'dynamicfs list-disks {pool}'): run remove-disk again to "
                        f"finish, or 'dynamicfs set-disk-health {pool} {disk} healthy' to keep it")
        if as_json:
            print_json(report)
            return
        click.echo(f"removed disk {report['disk_id']} {report['path']}: moved "
                   f"{report['fragments_moved']} fragments "
                   f"({format_size(report['bytes_moved'])}) of {report['extents']} extents")
        if not report["label_removed"]:
            click.echo(f"note: could not remove the DynamicFS label from {report['path']}; "
                       "delete dynamicfs.label there before reusing it")
        _warn_files("under-redundant (see 'dynamicfs status'; repair completes them "
                    "when disks allow)", report["under_redundant"],
                    report["files_under_redundant"])
        _warn_files("below their policy's minimum (forced)", report["below_minimum"],
                    report["files_below_minimum"])


def _warn_files(what: str, extents: int, files: list[str]) -> None:
    if not extents:
        return
    click.echo(f"warning: {extents} extents are {what}; files:", err=True)
    for path in files:
        click.echo(f"  {path}", err=True)
