"""Inspection commands: status, list-extents, show-redundancy."""

from __future__ import annotations

from typing import Any

import click

from dynamicfs.cli.common import flexible, print_json, print_table, run_op
from dynamicfs.sizes import format_size


def _status_text(s: dict[str, Any]) -> None:
    click.echo(f"pool {s['pool']} (uuid {s['uuid']})")
    policy = s["default_policy"]
    if policy == "auto":
        policy = f"auto (now: {s['auto_means']})"
    click.echo(f"default policy: {policy}; extents of {format_size(s['extent_size'])}")
    states = ", ".join(f"{n} {state}" for state, n in s["disks_by_state"].items() if n)
    click.echo(f"disks: {states or 'none'}")
    if s["disks"]:
        print_table(None, ["id", "path", "state", "capacity", "used", "free", "reason"],
                    [[d["id"], d["path"], d["state"], format_size(d["capacity"]),
                      format_size(d["used"]), format_size(d["free"]), d["reason"]]
                     for d in s["disks"]])
    click.echo(f"extents: {s['extents']} ({s['healthy']} healthy, {s['under_redundant']} "
               f"under-redundant, {s['unreadable']} unreadable), "
               f"{format_size(s['data_bytes'])} of file data")
    click.echo(f"raw capacity: {format_size(s['raw_capacity'])} on healthy disks, "
               f"{format_size(s['raw_used'])} used, {format_size(s['raw_free'])} free")
    for u in s["usable"]:
        click.echo(f"usable under {u['policy']}: {format_size(u['capacity'])}, "
                   f"{format_size(u['free'])} free")
    n = s["survives_failures"]
    click.echo(f"survives now: {n} arbitrary disk failure{'s' if n != 1 else ''} "
               "without losing data")
    for ids in s.get("shared_filesystems", []):
        click.echo(f"note: disks {', '.join(map(str, ids))} are on one filesystem, so one "
                   "failure of its device fails them together (the count above takes them "
                   "as separate disks)")
    click.echo(f"repair queue: {s['repair_queue']} extents")
    rebuild = s.get("rebuild")
    if rebuild and rebuild["active"]:
        left = rebuild["eta_seconds"]
        eta = f", about {left:.0f} s left" if left is not None else ""
        click.echo(f"rebuilding: {rebuild['done']} of {rebuild['total']} extents "
                   f"({rebuild['rate']:.1f}/s{eta}), {rebuild['failed']} failed")
    if s["files_at_risk_total"]:
        click.echo(f"files at risk (unreadable extents, lost writes): "
                   f"{s['files_at_risk_total']}")
        for path in s["files_at_risk"]:
            click.echo(f"  {path}")


def register(cli: click.Group) -> None:
    @cli.command("status")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def status(pool: str, as_json: bool) -> None:
        """Health of POOL: disks, extents by state, capacity, repair queue, files at risk."""
        result = run_op(pool, "status")
        if as_json:
            print_json(result)
        else:
            _status_text(result)

    @cli.command("list-extents")
    @flexible("pool")
    @click.option("--file", "path", metavar="PATH",
                  help="only the extents of this file (a path inside the pool, e.g. /dir/file)")
    @click.option("--json", "as_json", is_flag=True)
    def list_extents(pool: str, path: str | None, as_json: bool) -> None:
        """List the extents of POOL (or of one file) with their policy and state."""
        rows = run_op(pool, "list-extents", {"file": path})
        if as_json:
            print_json(rows)
            return
        print_table(None, ["extent", "file", "chunk", "length", "policy", "fragments", "state"],
                    [[r["id"], r["file"] or "-",
                      "-" if r["chunk"] is None else r["chunk"], r["length"], r["policy"],
                      f"{r['present']}/{r['width']}", r["state"]] for r in rows])

    @cli.command("show-redundancy")
    @flexible("pool")
    @click.option("--file", "path", metavar="PATH",
                  help="also show where each fragment of this file is")
    @click.option("--json", "as_json", is_flag=True)
    def show_redundancy(pool: str, path: str | None, as_json: bool) -> None:
        """Bytes stored per policy and their overhead; with --file, fragment placement."""
        result = run_op(pool, "show-redundancy", {"file": path})
        if as_json:
            print_json(result)
            return
        print_table(None, ["policy", "extents", "data", "raw", "overhead"],
                    [[u["policy"], u["extents"], format_size(u["bytes"]),
                      format_size(u["raw_bytes"]), f"{u['overhead']:.2f}x"]
                     for u in result["policies"]])
        if path is None:
            return
        print_table(f"fragments of {path}",
                    ["chunk", "extent", "policy", "length", "state", "index", "disk",
                     "disk path", "disk state", "size"],
                    [[e["chunk"], e["extent_id"], e["policy"], e["length"], e["state"],
                      f["index"], f["disk_id"], f["disk_path"], f["disk_state"], f["size"]]
                     for e in result["extents"] for f in e["fragments"]])
