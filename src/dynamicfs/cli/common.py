"""What every command shares: pool/disk arguments in two forms, running an admin
operation offline or through the mount daemon, progress bars, tables and JSON."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dynamicfs.admin import registry
from dynamicfs.admin.audited import run_offline
from dynamicfs.control import client
from dynamicfs.disks import faulty
from dynamicfs.engine.pool import Pool, check_pool_dir, directory_writable
from dynamicfs.errors import DynamicFSError, Interrupted, PoolBusyError, PoolError

# Piped output is read by scripts: tables there keep each row on one line.
PIPE_WIDTH = 4096


def _stdout_width() -> int | None:
    return None if sys.stdout.isatty() else PIPE_WIDTH


console = Console(width=_stdout_width())
err_console = Console(stderr=True)


Command = Callable[..., Any]


def flexible(*names: str, optional: Sequence[str] = ()) -> Callable[[Command], Command]:
    """Accept each of `names` positionally or as --NAME (users copy both from old docs)."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for name in names:
                pos = kwargs.pop(f"{name}_arg", None)
                opt = kwargs.pop(f"{name}_opt", None)
                if pos is not None and opt is not None and pos != opt:
                    raise click.UsageError(f"{name.upper()} given twice ({pos!r} and {opt!r})")
                value = opt if opt is not None else pos
                if value is None and name not in optional:
                    raise click.UsageError(f"missing {name.upper()} (give it as an argument "
                                           f"or as --{name})")
                kwargs[name] = value
            return fn(*args, **kwargs)

        for name in reversed(names):
            wrapper = click.option(f"--{name}", f"{name}_opt", metavar=name.upper(),
                                   help=f"the {name} (same as the positional form)")(wrapper)
        for name in reversed(names):
            metavar = f"[{name.upper()}]" if name in optional else name.upper()
            wrapper = click.argument(f"{name}_arg", metavar=metavar, required=False)(wrapper)
        return wrapper
    return decorate


class ProgressBar:
    """A rich progress bar fed by (done, total, message) callbacks; silent with --json."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.label = label
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TimeRemainingColumn(), console=err_console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int, message: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total or None,
                                  description=f"{self.label} {message}".strip())

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def run_op(pool_path: str, op: str, args: dict[str, Any] | None = None, *,
           progress_label: str | None = None, show_progress: bool = True,
           if_interrupted: str = "") -> Any:
    """Run an admin operation: in-process when the pool is free, else in its mount daemon.
    Ctrl-C says where the work was left: the daemon carries on with it; in-process it
    stops part way, and `if_interrupted` tells the user what that leaves behind.

    A pool directory on a read-only filesystem is opened read-only (Pool.open) for the
    operations that only read, and for the checks that change nothing but their own
    bookkeeping (Operation.changes_with), which then goes to a private copy of the
    metadata; the others are refused, with a note on what works."""
    pool_dir = check_pool_dir(pool_path)
    args = args or {}
    read_only = not directory_writable(pool_dir)
    operation = registry.get(op)
    if read_only and operation.changes(args):
        raise PoolError(f"pool directory {pool_dir} is read-only, and {op} would change the "
                        "pool; remount it read-write (status, list-disks, health, scrub and "
                        "fsck without --repair, and the other reports work as it is)")
    with ProgressBar(progress_label or op, enabled=show_progress) as bar:
        try:
            pool = Pool.open(pool_dir, read_only=read_only, scratch=operation.writes)
        except PoolBusyError:
            if client.socket_path(pool_dir).exists():
                try:
                    return client.call(pool_dir, op, args, bar)
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted; the mount daemon carries on with {op} "
                                      f"('dynamicfs status {pool_dir}' shows the pool)"
                                      ) from None
            raise
        if read_only:
            click.echo(f"note: pool directory {pool_dir} is read-only: showing the pool as "
                       "last stored; nothing in it can change", err=True)
        with pool:
            if os.environ.get(faulty.ENV_VAR):  # tests: disks that fail on purpose
                try:
                    faulty.wrap_backends(pool)
                except faulty.FaultSpecError as exc:
                    raise DynamicFSError(f"{faulty.ENV_VAR}: {exc}") from None
            try:
                return run_offline(pool, op, args, bar)  # logs to the pool, audits changes
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted: {op} stopped part way"
                                  + (f"; {if_interrupted}" if if_interrupted else "")) from None


_ID_OR_UUID = re.compile(r"\d+|[0-9a-fA-F-]{8,36}")


def disk_ref(ref: str) -> str:
    """A disk argument as the pool's code resolves it wherever it runs: a path made
    absolute here (a mount daemon's working directory is /, not the caller's); ids and
    UUIDs (or their prefixes) as given."""
    return ref if _ID_OR_UUID.fullmatch(ref) else os.path.abspath(ref)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# rich lays out a table in time that grows faster than its rows (minutes for 200,000);
# longer tables are printed as plain aligned columns.
RICH_ROWS = 2000


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """A table on stdout; wrapped to the terminal, never wrapped when piped."""
    if len(rows) > RICH_ROWS:
        _print_plain(title, columns, [[str(c) for c in row] for row in rows])
        return
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=_stdout_width()).print(table)


def _print_plain(title: str | None, columns: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(col)] + [len(row[i]) for row in rows]) for i, col in enumerate(columns)]
    out = [title] if title else []
    for line in [columns, *rows]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    click.echo("\n".join(out))
