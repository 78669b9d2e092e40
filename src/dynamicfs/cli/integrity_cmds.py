"""Integrity commands: scrub, repair, fsck, what-if, detect-orphans, cleanup-orphans,
orphan-stats, copy-metadata, recover-metadata.

Exit codes say what was found: 0 when all is well (or everything found was
repaired), 1 when problems remain (or, for what-if, when files would be lost).
"""

from __future__ import annotations

import time
from typing import Any

import click

from dynamicfs.admin.integrity import recover_metadata
from dynamicfs.cli.common import disk_ref, flexible, print_json, print_table, run_op
from dynamicfs.engine.pool import check_pool_dir, directory_writable
from dynamicfs.maintenance.gc import DEFAULT_GRACE, parse_age
from dynamicfs.sizes import format_size

# Paths listed per section in text output; --json lists them all.
SHOW_PATHS = 50


def _exit(code: int) -> None:
    if code:
        raise click.exceptions.Exit(code)


def _paths(paths: list[str], indent: str = "  ") -> None:
    for path in paths[:SHOW_PATHS]:
        click.echo(f"{indent}{path}")
    if len(paths) > SHOW_PATHS:
        click.echo(f"{indent}... and {len(paths) - SHOW_PATHS} more (see --json)")


def _read_only(pool: str) -> bool:
    return not directory_writable(check_pool_dir(pool))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def _next(command: str, read_only: bool) -> str:
    """The "next:" line's command: on a read-only pool directory it cannot run yet."""
    return f"once the pool directory is writable again, {command}" if read_only else command


def _show_scrub(r: dict[str, Any], read_only: bool = False) -> None:
    how = "scrub with repair" if r["repair"] else "scrub"
    when = "finished" if r["finished"] else "interrupted"
    resumed = ", resumed" if r["resumed"] else ""
    click.echo(f"{how} {when} after {_duration(r['duration'])}{resumed}: {r['checked']} extents "
               f"checked, {format_size(r['bytes'])} of data, {format_size(r['fragment_bytes'])} "
               f"read at {r['mb_per_s']:.0f} MB/s")
    click.echo(f"  {r['healthy']} healthy, {r['under_redundant']} under-redundant, "
               f"{r['repaired']} repaired, {r['unreadable']} unreadable")
    for d in r["disks"]:
        click.echo(f"  disk {d['id']} ({d['state']}): {d['problem']}")
    for note in r["notes"]:
        click.echo(f"  note: {note}")
    if r["problems"]:
        print_table(None, ["state", "extent", "files", "detail"],
                    [[p["state"], p["extent_id"], "\n".join(p["paths"][:5]) or "-",
                      p["detail"]] for p in r["problems"][:SHOW_PATHS]])
    if r["problems_total"] > SHOW_PATHS:
        click.echo(f"... {r['problems_total'] - SHOW_PATHS} more problem extents "
                   "(see --json)")
    lost = sorted({path for p in r["problems"] if p["state"] == "unreadable"
                   for path in p["paths"]})
    if lost:
        click.echo("errors: these files have parts that cannot be read; restore them from a "
                   "copy:")
        _paths(lost)
    if r["under_redundant"] and not r["repair"]:
        click.echo("next: " + _next("'dynamicfs repair' (or 'dynamicfs scrub --repair') "
                                    "restores redundancy", read_only))
    if r["clean"]:
        click.echo("no problems left")


def _show_repair(r: dict[str, Any]) -> None:
    click.echo(f"{r['pending']} extents needed repair; {r['attempted']} attempted in "
               f"{_duration(r['duration'])}: {r['repaired']} repaired, {r['already_healthy']} "
               f"already healthy, {r['partial']} partly, {r['stuck']} stuck, "
               f"{r['unreadable']} unreadable; {r['remaining']} remain")
    for note in r["notes"]:
        click.echo(f"  note: {note}")
    if r["problems"]:
        print_table(None, ["outcome", "extent", "files", "detail"],
                    [[p["outcome"], p["extent_id"], "\n".join(p["paths"][:5]) or "-",
                      p["detail"]] for p in r["problems"][:SHOW_PATHS]])


def _show_fsck(r: dict[str, Any], read_only: bool = False) -> None:
    counts = ", ".join(f"{n} {what}" for what, n in r["checked"].items())
    click.echo(f"fsck checked {counts} in {_duration(r['duration'])}")
    if r["problems"]:
        print_table(None, ["problem", "repaired", "detail", "files"],
                    [[p["kind"], "yes" if p["repaired"] else "no",
                      p["detail"] + (f" ({p['hint']})" if p["hint"] and not p["repaired"] else ""),
                      "\n".join(p["paths"][:5])] for p in r["problems"]])
    click.echo(f"{len(r['problems'])} problems found, {r['repaired']} repaired, "
               f"{r['remaining']} left")
    if r["remaining"] and not r["repair"]:
        click.echo("next: " + _next("'dynamicfs fsck --repair' fixes what is safe to fix",
                                    read_only))


def _show_what_if(r: dict[str, Any]) -> None:
    names = ", ".join(f"{d['id']} ({d['path']})" for d in r["disks"])
    click.echo(f"if disk {names} failed: {r['extents_affected']} extents touched, "
               f"{r['extents_unreadable']} would become unreadable, "
               f"{r['extents_less_redundant']} would lose redundancy")
    if r["unreadable"]:
        click.echo(f"files that would become unreadable ({len(r['unreadable'])}):")
        _paths([f["path"] for f in r["unreadable"]])
    if r["less_redundant"]:
        click.echo(f"files that would lose redundancy ({len(r['less_redundant'])}):")
        _paths([f"{f['path']} (would survive {f['margin']} more failures)"
                for f in r["less_redundant"]])
    if r["already_unreadable"]:
        click.echo(f"files already unreadable ({len(r['already_unreadable'])}):")
        _paths([f["path"] for f in r["already_unreadable"]])
    click.echo(f"the pool survives {r['survivable_now']} disk failures now, "
               f"{r['survivable_after']} after these")


def register(cli: click.Group) -> None:
    @cli.command("scrub")
    @flexible("pool")
    @click.option("--repair", is_flag=True, help="rebuild under-redundant extents as they are "
                  "found")
    @click.option("--restart", is_flag=True, help="start over instead of continuing an "
                  "interrupted scrub")
    @click.option("--json", "as_json", is_flag=True)
    def scrub(pool: str, repair: bool, restart: bool, as_json: bool) -> None:
        """Read and check every fragment of POOL; list problem extents and their files.

        Exits 0 when everything is healthy (or was repaired), 1 when problems remain.
        An interrupted scrub continues where it stopped.
        """
        result = run_op(pool, "scrub", {"repair": repair, "restart": restart},
                        progress_label="scrub", show_progress=not as_json)
        if as_json:
            print_json(result)
        else:
            _show_scrub(result, _read_only(pool))
        _exit(0 if result["clean"] else 1)

    @cli.command("repair")
    @flexible("pool")
    @click.option("--limit", type=click.IntRange(min=1), help="repair at most this many extents")
    @click.option("--json", "as_json", is_flag=True)
    def repair(pool: str, limit: int | None, as_json: bool) -> None:
        """Rebuild queued and under-redundant extents of POOL, least redundant first.

        Exits 0 when nothing is left to repair, 1 otherwise.
        """
        result = run_op(pool, "repair", {"limit": limit}, show_progress=not as_json)
        if as_json:
            print_json(result)
        else:
            _show_repair(result)
        _exit(0 if result["clean"] else 1)

    @cli.command("fsck")
    @flexible("pool")
    @click.option("--repair", is_flag=True, help="fix what is safe to fix")
    @click.option("--json", "as_json", is_flag=True)
    def fsck(pool: str, repair: bool, as_json: bool) -> None:
        """Check POOL's metadata against itself and its disks.

        Exits 0 when clean (or all problems were repaired), 1 when problems are left.
        """
        result = run_op(pool, "fsck", {"repair": repair}, show_progress=not as_json)
        if as_json:
            print_json(result)
        else:
            _show_fsck(result, _read_only(pool))
        _exit(0 if result["clean"] else 1)

    @cli.command("what-if")
    @flexible("pool")
    @click.option("--fail", "fail", multiple=True, metavar="DISK",
                  help="a disk to imagine failed (id, UUID or path); more may follow")
    @click.argument("more", nargs=-1, metavar="[DISK...]")
    @click.option("--json", "as_json", is_flag=True)
    def what_if(pool: str, fail: tuple[str, ...], more: tuple[str, ...], as_json: bool) -> None:
        """Which files of POOL would become unreadable or lose redundancy if disks failed.

        Usage: dynamicfs what-if POOL --fail DISK [DISK...]. Exits 1 when files would
        become unreadable, else 0.
        """
        disks = [disk_ref(d) for d in (*fail, *more)]
        if not disks:
            raise click.UsageError("name the disks to imagine failed: --fail DISK [DISK...]")
        result = run_op(pool, "what-if", {"fail": disks})
        if as_json:
            print_json(result)
        else:
            _show_what_if(result)
        _exit(1 if result["loses_data"] else 0)

    @cli.command("detect-orphans")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def detect_orphans(pool: str, as_json: bool) -> None:
        """List orphan fragments and extents no file uses (exit 1 if any)."""
        result = run_op(pool, "detect-orphans")
        if as_json:
            print_json(result)
        else:
            if result["orphans"]:
                print_table(None, ["disk", "fragment", "size", "age", "path"],
                            [[o["disk_id"], o["fragment_id"], format_size(o["size"]),
                              _duration(o["age"]), o["path"]] for o in result["orphans"]])
            total = sum(o["size"] for o in result["orphans"])
            click.echo(f"{len(result['orphans'])} orphan fragments "
                       f"({format_size(total)}), {len(result['extents'])} extents no file "
                       "uses")
            if result["current"]:
                click.echo(f"{result['current']} more belong to the pool's current open "
                           "(possibly being written) and are left alone")
            for skipped in result["skipped_disks"]:
                click.echo(f"  skipped {skipped}")
        _exit(1 if result["orphans"] or result["extents"] else 0)

    @cli.command("cleanup-orphans")
    @flexible("pool")
    @click.option("--older-than", "older_than", metavar="AGE", default="1h", show_default=True,
                  help="only what is at least this old, e.g. 0s, 10m, 2h, 7d")
    @click.option("--json", "as_json", is_flag=True)
    def cleanup_orphans(pool: str, older_than: str, as_json: bool) -> None:
        """Delete orphan fragments and empty segment files; free extents no file uses."""
        age = parse_age(older_than) if older_than else DEFAULT_GRACE
        result = run_op(pool, "cleanup-orphans", {"older_than": age})
        if as_json:
            print_json(result)
        else:
            click.echo(f"deleted {result['deleted']} orphan fragments "
                       f"({format_size(result['deleted_bytes'])}), compacted "
                       f"{result['segments_compacted']} and removed "
                       f"{result['segments_removed']} segment files "
                       f"({format_size(result['segment_bytes'])}), freed "
                       f"{result['extents_freed']} unused extents")
            if result["kept_young"]:
                click.echo(f"kept {result['kept_young']} younger than {older_than}")
            for err in result["errors"]:
                click.echo(f"  could not delete {err}")
        _exit(1 if result["errors"] else 0)

    @cli.command("orphan-stats")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def orphan_stats(pool: str, as_json: bool) -> None:
        """Orphan fragments per disk, and extents no file uses."""
        result = run_op(pool, "orphan-stats")
        if as_json:
            print_json(result)
            return
        print_table(None, ["disk", "path", "orphans", "size", "oldest", "older than 1h"],
                    [[d["disk_id"], d["path"], d["orphans"], format_size(d["bytes"]),
                      _duration(d["oldest"]) if d["orphans"] else "-", d["older_than_grace"]]
                     for d in result["disks"]])
        click.echo(f"{result['orphans']} orphan fragments ({format_size(result['bytes'])}),"
                   f" {result['extents']} unused extents ({format_size(result['extent_bytes'])})")

    @cli.command("copy-metadata")
    @flexible("pool")
    @click.option("--json", "as_json", is_flag=True)
    def copy_metadata(pool: str, as_json: bool) -> None:
        """Copy POOL's metadata database to up to 3 healthy disks."""
        result = run_op(pool, "copy-metadata")
        if as_json:
            print_json(result)
            return
        where = ", ".join(f"disk {d['id']} ({d['path']})" for d in result["disks"])
        click.echo(f"metadata generation {result['generation']} "
                   f"({format_size(result['size'])}) copied to {where}")
        for failed in result["failed"]:
            click.echo(f"  failed: {failed}")

    @cli.command("recover-metadata")
    @flexible("pool")
    @click.option("--from", "from_disk", metavar="DISK",
                  help="restore from this disk directory only")
    @click.option("--disk", "disks", multiple=True, metavar="DIR",
                  help="a disk directory of the pool to search (repeatable); the disks in "
                       "POOL/disks.json are searched too")
    @click.option("--force", is_flag=True, help="replace pool.db even though it is valid")
    @click.option("--json", "as_json", is_flag=True)
    def recover(pool: str, from_disk: str | None, disks: tuple[str, ...], force: bool,
                as_json: bool) -> None:
        """Restore POOL's metadata database from the newest valid copy on its disks."""
        result = recover_metadata(pool, list(disks), from_disk, force)
        if as_json:
            print_json(result)
            return
        click.echo(f"restored metadata generation {result['generation']} from "
                   f"{result['source']} (copied {time.ctime(result['copied_at'])})")
        for path in result["moved_aside"]:
            click.echo(f"  moved aside: {path}")
        for moved in result["disks_moved"]:
            click.echo(f"  disk path updated: {moved}")
        for note in result["notes"]:
            click.echo(f"  {note}")
