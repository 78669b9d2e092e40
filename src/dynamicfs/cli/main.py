"""The `dynamicfs` command: a click group; each family of commands lives in its own module.

Errors a user can cause (DynamicFSError, and ENOTCONN from a path in a FUSE mount whose
daemon has stopped) print one line and exit non-zero; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import errno
import importlib
import sys

import click

from dynamicfs import __version__
from dynamicfs.errors import DynamicFSError

# Modules that add commands to `cli`; each has `register(cli)`.
COMMAND_MODULES = (
    "dynamicfs.cli.pool_cmds",
    "dynamicfs.cli.disk_cmds",
    "dynamicfs.cli.inspect_cmds",
    "dynamicfs.cli.mount_cmds",
    "dynamicfs.cli.integrity_cmds",
    "dynamicfs.cli.ops_cmds",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dynamicfs")
def cli() -> None:
    """DynamicFS: pool unequal disks into one checksummed, self-healing filesystem."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(cli)


def main(argv: list[str] | None = None) -> int:
    try:
        _register_all()  # imports: Ctrl-C may come here too
        # Without standalone mode click returns (not raises) the code of
        # click.exceptions.Exit / ctx.exit(); commands use it to say what they found.
        code = cli.main(args=argv, prog_name="dynamicfs", standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    except DynamicFSError as exc:
        # Errors that are OSErrors too (ENOSPC, ...) say their text without "[Errno N]".
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        click.echo(f"dynamicfs: error: {text}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("dynamicfs: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("dynamicfs: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        from dynamicfs.fuse.daemon import not_connected  # only when needed

        click.echo(f"dynamicfs: error: {not_connected(exc.filename or '.')}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
