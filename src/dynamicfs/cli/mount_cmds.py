"""`mount`, `unmount` and `sync`: attach a pool to a directory through FUSE, detach it,
and make what was written to it durable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from dynamicfs.cli.common import flexible, print_json, run_op
from dynamicfs.errors import DynamicFSError
from dynamicfs.fuse import daemon
from dynamicfs.observability.log import LEVELS, log_path


def register(cli: click.Group) -> None:
    @cli.command("mount")
    @flexible("pool", "mountpoint")
    @click.option("-f", "--foreground", is_flag=True,
                  help="stay in the foreground and log to stderr too (stop with Ctrl-C)")
    @click.option("-o", "options", multiple=True, metavar="OPTIONS",
                  help="comma-separated mount options: ro, allow_other, nonempty (mount over "
                       "a non-empty directory), log_level=LEVEL, metrics_address=HOST:PORT, "
                       "and other FUSE options")
    @click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False),
                  help="what goes to POOL/logs/dynamicfs.log (default: info)")
    @click.option("--metrics-address", metavar="HOST:PORT",
                  help="serve Prometheus /metrics and /health there while mounted")
    def mount(pool: str, mountpoint: str, foreground: bool, options: tuple[str, ...],
              log_level: str | None, metrics_address: str | None) -> None:
        """Mount POOL at MOUNTPOINT, an empty directory.

        Returns once the filesystem is ready; the mount daemon keeps running in the
        background until 'dynamicfs unmount MOUNTPOINT'.
        """
        if metrics_address:
            options = (*options, f"metrics_address={metrics_address}")
        code = mount_pool(pool, mountpoint, options, foreground=foreground, log_level=log_level)
        if code:
            raise click.exceptions.Exit(code)

    @cli.command("unmount")
    @click.option("-l", "--lazy", is_flag=True,
                  help="detach now even if busy; the pool closes when the last user leaves")
    @flexible("mountpoint")
    def unmount(mountpoint: str, lazy: bool) -> None:
        """Unmount MOUNTPOINT (or the mount of pool MOUNTPOINT), flushing every file.

        Waits until the mount daemon has written everything and exited.
        """
        done = daemon.unmount(mountpoint, lazy=lazy)
        if lazy:
            click.echo(f"detached {done.mountpoint}; the pool closes once nothing uses it")
        elif done.pid is None:
            click.echo(f"unmounted {done.mountpoint} (no mount daemon was running: cleared "
                       "the mount it left behind)")
        elif done.problem:
            raise DynamicFSError(f"unmounted {done.mountpoint}, but {done.problem}; see "
                                 f"{log_path(done.pool or '.')}")
        else:
            pool = f" (pool {done.pool} flushed and closed)" if done.pool else ""
            click.echo(f"unmounted {done.mountpoint}{pool}")

    cli.add_command(click.Command("umount", callback=unmount.callback, params=unmount.params,
                                  help=unmount.help, hidden=True))

    @cli.command("sync")
    @flexible("path", optional=("path",))
    @click.option("--json", "as_json", is_flag=True)
    def sync(path: str | None, as_json: bool) -> None:
        """Make everything written to a mounted pool durable now.

        PATH is the mountpoint, any path inside the mount, or the pool; without it,
        every DynamicFS mount of this machine. Every file's buffered data, open files
        included, goes to the disks and the metadata is committed, as an fsync of every
        file would; sync(1) does not reach FUSE filesystems. A pool that is not mounted
        has nothing buffered.
        """
        if path is not None:
            pool_dir, mountpoint = daemon.pool_of(path)
            done = _sync(pool_dir, mountpoint)
            if as_json:
                print_json(done)
            else:
                click.echo(_synced_text(done))
            return
        results, failed = [], []
        for mounted, pool in daemon.dynamicfs_mounts():
            if pool is None:
                failed.append(f"cannot tell which pool is mounted at {mounted}; run "
                              "'dynamicfs sync POOL' with its pool directory")
                continue
            try:
                results.append(_sync(pool, mounted))
            except DynamicFSError as exc:
                failed.append(str(exc) if str(mounted) in str(exc) else f"{mounted}: {exc}")
        if as_json:
            print_json(results)
        else:
            for done in results:
                click.echo(_synced_text(done))
            if not results and not failed:
                click.echo("no DynamicFS mounts: nothing is buffered")
        for line in failed:
            click.echo(f"dynamicfs: error: {line}", err=True)
        if failed:
            raise click.exceptions.Exit(1)


def _sync(pool_dir: Path, mountpoint: Path | None) -> dict[str, Any]:
    """The mount daemon's sync operation for one pool (nothing to do when unmounted)."""
    start = time.monotonic()
    if mountpoint is not None:
        daemon.check_served(pool_dir, mountpoint)
        run_op(str(pool_dir), "sync", show_progress=False)
    return {"pool": str(pool_dir), "mountpoint": mountpoint and str(mountpoint),
            "seconds": round(time.monotonic() - start, 3)}


def _synced_text(done: dict[str, Any]) -> str:
    if done["mountpoint"] is None:
        return f"pool {done['pool']} is not mounted: nothing is buffered"
    return f"synced {done['mountpoint']} (pool {done['pool']}) in {done['seconds']:.2f} s"


def mount_pool(pool: str, mountpoint: str, options: tuple[str, ...] | list[str], *,
               foreground: bool = False, log_level: str | None = None,
               quiet: bool = False) -> int:
    """Check, then mount (detached, or in this process with `foreground`); an exit code."""
    opts = daemon.parse_options(options)
    if log_level:
        opts.log_level = log_level.lower()
    pool_dir, mnt = daemon.check_mountable(pool, mountpoint, opts)
    if foreground:
        def ready() -> None:
            click.echo(f"mounted {pool_dir} at {mnt}; stop with Ctrl-C or "
                       f"'dynamicfs unmount {mnt}'", err=True)

        return daemon.serve(pool_dir, mnt, opts, foreground=True, ready=ready)
    pid = daemon.start_detached(pool_dir, mnt, opts)
    if not quiet:
        click.echo(f"mounted {pool_dir} at {mnt} (daemon pid {pid}); "
                   f"unmount with 'dynamicfs unmount {mnt}'")
    return 0
