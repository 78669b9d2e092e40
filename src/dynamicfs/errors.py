"""The exceptions every layer raises.

Owns the split between user errors (one line, says what to do; the CLI prints them
and exits non-zero) and POSIX errors raised by the namespace (mapped to errno by the
FUSE adapter). Nothing here imports from the rest of the package.
"""

from __future__ import annotations

import errno as _errno


class DynamicFSError(Exception):
    """A problem a user can fix: the message is one line and says what to do next."""

    exit_code = 1


class Interrupted(DynamicFSError):
    """Ctrl-C during an operation; the message says where the work was left."""

    exit_code = 130


class PoolError(DynamicFSError):
    """The pool is missing, malformed, of a newer format, locked or read-only."""


class PoolBusyError(PoolError):
    """The pool is mounted or otherwise locked by another process."""

    exit_code = 3


class DiskError(DynamicFSError):
    """A disk is unknown, refused, missing or unusable."""


class PolicyError(DynamicFSError):
    """A redundancy policy string is malformed or cannot be met."""


class SizeError(DynamicFSError):
    """A size such as '1MiB' is malformed."""


class DataAtRiskError(DynamicFSError):
    """An operation would lose data; it names the files at stake."""

    def __init__(self, message: str, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.paths = paths or []


class FsError(OSError):
    """A POSIX error from the namespace; `errno` is what the caller should see."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail or _errno.errorcode.get(code, str(code)))


class NoSpaceError(FsError, DynamicFSError):
    """No placement is possible: not enough healthy disks with free capacity."""

    def __init__(self, detail: str) -> None:
        FsError.__init__(self, _errno.ENOSPC, detail)


class UnreadableError(FsError, DynamicFSError):
    """An extent cannot be served correctly (too few good fragments)."""

    def __init__(self, detail: str) -> None:
        FsError.__init__(self, _errno.EIO, detail)
