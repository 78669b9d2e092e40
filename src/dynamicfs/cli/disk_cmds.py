"""Disk commands: add-disk, list-disks, set-disk-health, fail-disk, probe-disks."""

from __future__ import annotations

import click

from dynamicfs.cli.common import flexible, print_json, print_table, run_op
from dynamicfs.sizes import format_size, parse_size


def register(cli: click.Group) -> None:
    @cli.command("add-disk")
    @flexible("pool", "disk")
    @click.option("--capacity", help="cap what the pool may store there, e.g. 500G "
                                     "(default: the free space of its filesystem)")
    @click.option("--tier", default="default", show_default=True, help="tier name, e.g. fast")
    @click.option("--json", "as_json", is_flag=True)
    def add_disk(pool: str, disk: str, capacity: str | None, tier: str, as_json: bool) -> None:
        """Add directory DISK to POOL (works while the pool is mounted)."""
        cap = parse_size(capacity) if capacity else None
        row = run_op(pool, "add-disk", {"path": disk, "capacity": cap, "tier": tier})
        if as_json:
            print_json(row)
        else:
            click.echo(f"added disk {row['id']} {row['path']} ({format_size(row['capacity'])}, "
                       f"tier {row['tier']})")

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
