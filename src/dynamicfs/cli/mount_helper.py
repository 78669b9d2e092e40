"""`mount.fuse.dynamicfs`: the helper mount(8) runs for fstab entries of type fuse.dynamicfs.

    POOL  MOUNTPOINT  fuse.dynamicfs  defaults  0 0

mount(8) runs `mount.fuse.dynamicfs POOL MOUNTPOINT [-sfnvrw] [-N NS] [-o OPTIONS]`
(it looks for the helper in /sbin: see docs/MOUNTING.md). The helper mounts like
`dynamicfs mount POOL MOUNTPOINT -o OPTIONS` and returns once the mount is ready.
Exit codes follow mount(8): 1 for a wrong invocation, 32 when mounting failed.
"""

from __future__ import annotations

import sys

from dynamicfs.cli.mount_cmds import mount_pool
from dynamicfs.errors import DynamicFSError

PROG = "mount.fuse.dynamicfs"
USAGE = f"usage: {PROG} POOL MOUNTPOINT [-sfnvrw] [-N NAMESPACE] [-o OPTIONS]"
EX_USAGE = 1
EX_FAIL = 32


def parse_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(positionals, option groups, fake) from mount(8)'s argument conventions."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options.append(next(args, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg in ("-N", "-t"):  # namespace (unsupported beyond the current one), type
            next(args, None)
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "f":
                    fake = True
                elif flag == "r":
                    options.append("ro")
                elif flag not in "snvw":
                    raise ValueError(f"unknown flag -{flag}")
        else:
            positional.append(arg)
    return positional, options, fake


def main(argv: list[str] | None = None) -> int:
    try:
        positional, options, fake = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{PROG}: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    if len(positional) != 2:
        print(USAGE, file=sys.stderr)
        return EX_USAGE
    if fake:
        return 0
    pool, mountpoint = positional
    try:
        return EX_FAIL if mount_pool(pool, mountpoint, options, quiet=True) else 0
    except DynamicFSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EX_FAIL


if __name__ == "__main__":
    sys.exit(main())
