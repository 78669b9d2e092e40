"""The FUSE adapter: each FUSE request becomes one call of the namespace.

Owns the translation between FUSE requests (fuse/protocol.py) and the namespace and
nothing else: inode numbers are the namespace's, a file handle is the inode number of
the opened file (the namespace counts opens per inode), errors become errno values.
POSIX semantics, buffering and durability live in namespace/fs.py; reading requests
and writing replies is fuse/session.py's.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
import traceback
from collections.abc import Callable

from dynamicfs.errors import DynamicFSError, FsError
from dynamicfs.fuse import protocol as fp
from dynamicfs.fuse.session import Reply, ReplyError
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import Attr
from dynamicfs.observability.log import error
from dynamicfs.observability.metrics import FUSE_OP_ERRORS, observe_fuse

# Attributes, entries and misses (names that do not exist) the kernel may cache without
# asking again. Everything that changes them goes through this mount, so the kernel
# invalidates what it changes itself; the timeout only bounds how stale st_blocks may
# look after a background conversion, and how long a name that `fsck --repair` puts
# into /lost+found on a mounted pool may stay unseen by a lookup that missed it before.
CACHE_TIMEOUT = 1.0
# Write-only opens skip the page cache (FOPEN_DIRECT_IO): each write then goes to the
# daemon without the kernel's copy into page-cache pages and without the
# `security.capability` getxattr the kernel sends ahead of every cached write. Measured:
# 1 GiB written under ec:4+2 at 356-455 against 210-289 MiB/s (three pairs), under
# replicate:3 at 389-443 against 291-324, a tar of 1,179 files (80 MB) extracted in
# 2.1-2.6 s against 3.3-4.7 s. Other openers of the file keep their cached pages, so
# this needs a kernel that invalidates those pages around every such write (before
# it since Linux 6.6, after it since 6.19, backported to 6.18.y in early 2026):
# elsewhere write-only opens go through the page cache like the rest.
WRITE_ONLY_DIRECT_SINCE = ((6, 19, 0), (6, 18, 10))
# Large st_blksize makes cp, dd and friends use large buffers: one FUSE request per MiB.
BLOCK_SIZE = 1024 * 1024
# POSIX ACLs are not supported (the INIT reply does not ask for them). Refusing to store
# them makes cp -a, tar and rsync fall back to chmod; stored as plain xattrs they would
# leave modes stale.
ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})


def kernel_keeps_cache_right_around_direct_writes(release: str | None = None) -> bool:
    """Whether this Linux (`uname -r`) invalidates cached pages before and after each
    write through a FOPEN_DIRECT_IO file (see WRITE_ONLY_DIRECT_SINCE)."""
    digits = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or os.uname().release)
    if digits is None:
        return False
    version = tuple(int(d or 0) for d in digits.groups())
    newest, backport = WRITE_ONLY_DIRECT_SINCE
    return version >= newest or (version[:2] == backport[:2] and version >= backport)


class Operations:
    """FUSE request handlers over one Namespace; `handle` is the session's handler.

    Concurrency rules:
    - Each request is handled on the session's worker thread that read it, start to
      end; requests overlap (the session keeps a worker waiting for the next one).
    - Handlers call the namespace directly and may block in it (fragment reads, the
      flusher's back-pressure, the metadata lock, fsync); the namespace is thread-safe
      and does its own locking. Nothing here holds state between requests except the
      namespace itself, so handlers need no locks.
    - Handlers return the reply's bytes (a sequence of buffers for large replies, sent
      without joining them) and raise only ReplyError; `handle` times each request for
      the metrics and turns anything else into an errno (a bug becomes EIO and a log
      entry, never a request left unanswered).

    Meaning of the values handed to the kernel:
    - inode numbers are namespace inode numbers (the root is 1); generation is 0
      because inode numbers are never reused while the pool exists;
    - a file handle `fh` is the inode number of the open file; open and create count
      one open in the namespace and release gives it back, so the namespace knows when
      the last handle is gone (write-back, freeing unlinked files);
    - a directory handle is the directory's inode number;
    - readdir offsets are the namespace's entry ids, stable while the directory
      changes; "." and ".." are not listed (lookup answers them, and readdirplus would
      have to leave their lookup counts alone);
    - lookup counts are not tracked (FORGET is ignored): the namespace keeps an
      unlinked inode exactly as long as it is open, and the kernel never needs an
      unopened, unlinked inode again.
    Permissions are checked by the kernel (mount option default_permissions), so
    ACCESS always allows. POSIX ACLs are not supported: setting one fails with
    EOPNOTSUPP, which tools take as "use the mode bits". fallocate(2) reaches the
    namespace (its docstring says which modes a copy-on-write pool honours; the others
    fail with EOPNOTSUPP).
    """

    def __init__(self, namespace: Namespace, *, timeout: float = CACHE_TIMEOUT) -> None:
        self.ns = namespace
        self.timeout = timeout
        self.write_only_direct = kernel_keeps_cache_right_around_direct_writes()
        self._handlers: dict[int, tuple[str, Callable[[fp.Request], Reply]]] = {
            fp.LOOKUP: ("lookup", self.lookup), fp.GETATTR: ("getattr", self.getattr),
            fp.SETATTR: ("setattr", self.setattr), fp.READLINK: ("readlink", self.readlink),
            fp.SYMLINK: ("symlink", self.symlink), fp.MKNOD: ("mknod", self.mknod),
            fp.MKDIR: ("mkdir", self.mkdir), fp.UNLINK: ("unlink", self.unlink),
            fp.RMDIR: ("rmdir", self.rmdir), fp.RENAME: ("rename", self.rename),
            fp.RENAME2: ("rename", self.rename2), fp.LINK: ("link", self.link),
            fp.OPEN: ("open", self.open), fp.READ: ("read", self.read),
            fp.WRITE: ("write", self.write), fp.STATFS: ("statfs", self.statfs),
            fp.RELEASE: ("release", self.release), fp.FSYNC: ("fsync", self.fsync),
            fp.SETXATTR: ("setxattr", self.setxattr), fp.GETXATTR: ("getxattr", self.getxattr),
            fp.LISTXATTR: ("listxattr", self.listxattr),
            fp.REMOVEXATTR: ("removexattr", self.removexattr),
            fp.FLUSH: ("flush", self.flush), fp.OPENDIR: ("opendir", self.opendir),
            fp.READDIR: ("readdir", self.readdir), fp.READDIRPLUS: ("readdir", self.readdirplus),
            fp.RELEASEDIR: ("releasedir", self.releasedir),
            fp.FSYNCDIR: ("fsyncdir", self.fsync), fp.ACCESS: ("access", self.access),
            fp.CREATE: ("create", self.create), fp.FALLOCATE: ("fallocate", self.fallocate),
        }

    def handle(self, req: fp.Request) -> Reply:
        """Answer one request (the session's handler): its reply, or ReplyError."""
        found = self._handlers.get(req.opcode)
        if found is None:
            raise ReplyError(errno.ENOSYS)
        op, handler = found
        start = time.perf_counter()
        code = 0
        try:
            return handler(req)
        except ReplyError as exc:
            code = exc.errno
            raise
        except OSError as exc:  # FsError and its subclasses, and real I/O errors
            code = exc.errno or errno.EIO
            raise ReplyError(code) from None
        except DynamicFSError as exc:
            code = errno.EIO
            error("request failed", op=op, reason=str(exc))
            raise ReplyError(code) from None
        except Exception:
            code = errno.EIO
            error("request crashed", op=op, trace=traceback.format_exc())
            raise ReplyError(code) from None
        finally:
            observe_fuse(op, time.perf_counter() - start)
            if code:
                FUSE_OP_ERRORS.labels(op, errno.errorcode.get(code, str(code))).inc()

    def _entry(self, attr: Attr) -> bytes:
        return fp.pack_entry(attr, BLOCK_SIZE, self.timeout)

    def _attr(self, attr: Attr) -> bytes:
        return fp.pack_attr_out(attr, BLOCK_SIZE, self.timeout)

    # ------------------------------------------------------------------ names
    def lookup(self, req: fp.Request) -> Reply:
        (name,) = fp.names(req.args, 1)
        try:
            return self._entry(self.ns.lookup(req.nodeid, name))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # Cached by the kernel as a miss (a negative dentry) like any other entry:
            # a create, link, rename or mkdir through this mount replaces it at once.
            return fp.pack_negative_entry(self.timeout)

    def getattr(self, req: fp.Request) -> Reply:
        return self._attr(self.ns.getattr(req.nodeid))

    def setattr(self, req: fp.Request) -> Reply:
        (valid, _, _fh, size, _, atime, mtime, _, atime_ns, mtime_ns, _, mode, _, uid, gid,
         _) = fp.SETATTR_IN.unpack_from(req.args)
        now = time.time_ns()

        def when(field: int, now_field: int, secs: int, nsecs: int) -> int | None:
            if valid & now_field:
                return now
            return secs * 1_000_000_000 + nsecs if valid & field else None

        return self._attr(self.ns.setattr(
            req.nodeid,
            mode=mode if valid & fp.FATTR_MODE else None,
            uid=uid if valid & fp.FATTR_UID else None,
            gid=gid if valid & fp.FATTR_GID else None,
            size=size if valid & fp.FATTR_SIZE else None,
            atime_ns=when(fp.FATTR_ATIME, fp.FATTR_ATIME_NOW, atime, atime_ns),
            mtime_ns=when(fp.FATTR_MTIME, fp.FATTR_MTIME_NOW, mtime, mtime_ns)))

    def mknod(self, req: fp.Request) -> Reply:
        mode, rdev, _, _ = fp.MKNOD_IN.unpack_from(req.args)
        (name,) = fp.names(req.args[fp.MKNOD_IN.size:], 1)
        return self._entry(self.ns.mknod(req.nodeid, name, mode, rdev, req.uid, req.gid))

    def mkdir(self, req: fp.Request) -> Reply:
        mode, _ = fp.MKDIR_IN.unpack_from(req.args)
        (name,) = fp.names(req.args[fp.MKDIR_IN.size:], 1)
        return self._entry(self.ns.mkdir(req.nodeid, name, mode, req.uid, req.gid))

    def create(self, req: fp.Request) -> Reply:
        flags, mode, _, _ = fp.CREATE_IN.unpack_from(req.args)
        (name,) = fp.names(req.args[fp.CREATE_IN.size:], 1)
        attr = self.ns.create(req.nodeid, name, mode, req.uid, req.gid)
        return self._entry(attr) + self._open_reply(attr.ino, flags)

    def symlink(self, req: fp.Request) -> Reply:
        name, target = fp.names(req.args, 2)
        return self._entry(self.ns.symlink(req.nodeid, name, target, req.uid, req.gid))

    def readlink(self, req: fp.Request) -> Reply:
        return self.ns.readlink(req.nodeid)

    def link(self, req: fp.Request) -> Reply:
        (ino,) = fp.LINK_IN.unpack_from(req.args)
        (name,) = fp.names(req.args[fp.LINK_IN.size:], 1)
        return self._entry(self.ns.link(ino, req.nodeid, name))

    def unlink(self, req: fp.Request) -> Reply:
        (name,) = fp.names(req.args, 1)
        self.ns.unlink(req.nodeid, name)
        return b""

    def rmdir(self, req: fp.Request) -> Reply:
        (name,) = fp.names(req.args, 1)
        self.ns.rmdir(req.nodeid, name)
        return b""

    def rename(self, req: fp.Request) -> Reply:
        (new_parent,) = fp.RENAME_IN.unpack_from(req.args)
        old, new = fp.names(req.args[fp.RENAME_IN.size:], 2)
        self.ns.rename(req.nodeid, old, new_parent, new, 0)
        return b""

    def rename2(self, req: fp.Request) -> Reply:
        # RENAME_NOREPLACE and RENAME_EXCHANGE (1, 2) are the namespace's values.
        new_parent, flags, _ = fp.RENAME2_IN.unpack_from(req.args)
        old, new = fp.names(req.args[fp.RENAME2_IN.size:], 2)
        self.ns.rename(req.nodeid, old, new_parent, new, flags)
        return b""

    def access(self, req: fp.Request) -> Reply:
        return b""

    # ------------------------------------------------------------------ files
    def open(self, req: fp.Request) -> Reply:
        flags, _ = fp.OPEN_IN.unpack_from(req.args)
        self.ns.open(req.nodeid)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # The INIT reply asks for atomic O_TRUNC: the kernel sends no setattr for it.
            try:
                self.ns.setattr(req.nodeid, size=0)
            except BaseException:
                self.ns.release(req.nodeid)
                raise
        return self._open_reply(req.nodeid, flags)

    def _open_reply(self, inode: int, flags: int) -> bytes:
        """keep_cache: pages of this file stay valid across opens (every change to the
        file passes through this mount), so mmap and re-reads are served by the kernel.
        direct_io for write-only opens where the kernel allows it (WRITE_ONLY_DIRECT_SINCE)."""
        open_flags = fp.FOPEN_KEEP_CACHE
        if self.write_only_direct and flags & os.O_ACCMODE == os.O_WRONLY:
            open_flags |= fp.FOPEN_DIRECT_IO
        return fp.pack_open(inode, open_flags)

    def read(self, req: fp.Request) -> Reply:
        fh, offset, size, _, _, _, _ = fp.READ_IN.unpack_from(req.args)
        return self.ns.read(fh, offset, size)

    def write(self, req: fp.Request) -> Reply:
        fh, offset, size, _, _, _, _ = fp.WRITE_IN.unpack_from(req.args)
        # A view of the worker's buffer: the namespace copies what it keeps.
        data = req.args[fp.WRITE_IN.size:fp.WRITE_IN.size + size]
        return fp.WRITE_OUT.pack(self.ns.write(fh, offset, data), 0)

    def flush(self, req: fp.Request) -> Reply:
        fh, _, _, _ = fp.FLUSH_IN.unpack_from(req.args)
        self.ns.flush(fh)
        return b""

    def fsync(self, req: fp.Request) -> Reply:
        fh, flags, _ = fp.FSYNC_IN.unpack_from(req.args)
        self.ns.fsync(fh, bool(flags & fp.FSYNC_FDATASYNC))
        return b""

    def fallocate(self, req: fp.Request) -> Reply:
        fh, offset, length, mode, _ = fp.FALLOCATE_IN.unpack_from(req.args)
        self.ns.fallocate(fh, offset, length, mode)
        return b""

    def release(self, req: fp.Request) -> Reply:
        fh, _, _, _ = fp.RELEASE_IN.unpack_from(req.args)
        self.ns.release(fh)
        return b""

    # ------------------------------------------------------------------ directories
    def opendir(self, req: fp.Request) -> Reply:
        if not stat.S_ISDIR(self.ns.getattr(req.nodeid).mode):
            raise ReplyError(errno.ENOTDIR)
        return fp.pack_open(req.nodeid, 0)

    def readdir(self, req: fp.Request) -> Reply:
        return self._listing(req, plus=False)

    def readdirplus(self, req: fp.Request) -> Reply:
        return self._listing(req, plus=True)

    def _listing(self, req: fp.Request, *, plus: bool) -> Reply:
        """As many entries after the request's offset as fit in its size."""
        fh, offset, size, _, _, _, _ = fp.READ_IN.unpack_from(req.args)
        # About as many entries as fit: ~180 bytes each with attributes, ~40 without.
        batch = max(1, size // (180 if plus else 40))
        parts: list[bytes] = []
        used = 0
        while True:
            entries = self.ns.readdir(fh, offset, batch)
            for entry in entries:
                if plus:
                    part = fp.pack_direntplus(entry.name, entry.attr, BLOCK_SIZE,
                                              self.timeout, entry.next_offset)
                else:
                    part = fp.pack_dirent(entry.name, entry.attr.ino, entry.attr.mode,
                                          entry.next_offset)
                if used + len(part) > size:
                    return parts
                parts.append(part)
                used += len(part)
                offset = entry.next_offset
            if len(entries) < batch:
                return parts

    def releasedir(self, req: fp.Request) -> Reply:
        return b""

    # ------------------------------------------------------------------ xattrs
    def getxattr(self, req: fp.Request) -> Reply:
        size, _ = fp.GETXATTR_IN.unpack_from(req.args)
        (name,) = fp.names(req.args[fp.GETXATTR_IN.size:], 1)
        if self.ns.xattr_never_set(name):  # e.g. security.capability, before every write
            raise ReplyError(errno.ENODATA)
        return _sized(self.ns.getxattr(req.nodeid, name), size)

    def setxattr(self, req: fp.Request) -> Reply:
        size, flags = fp.SETXATTR_IN.unpack_from(req.args)
        rest = bytes(req.args[fp.SETXATTR_IN.size:])
        name, _, tail = rest.partition(b"\0")
        if name in ACL_XATTRS:
            raise ReplyError(errno.EOPNOTSUPP)
        self.ns.setxattr(req.nodeid, name, tail[:size], flags)
        return b""

    def listxattr(self, req: fp.Request) -> Reply:
        size, _ = fp.GETXATTR_IN.unpack_from(req.args)
        names = self.ns.listxattr(req.nodeid)
        return _sized(b"".join(name + b"\0" for name in names), size)

    def removexattr(self, req: fp.Request) -> Reply:
        (name,) = fp.names(req.args, 1)
        self.ns.removexattr(req.nodeid, name)
        return b""

    # ------------------------------------------------------------------ filesystem
    def statfs(self, req: fp.Request) -> Reply:
        s = self.ns.statfs()
        return fp.STATFS_OUT.pack(s.blocks, s.blocks_free, s.blocks_avail, s.files,
                                  s.files_free, s.block_size, s.name_max, s.fragment_size, 0)


def _sized(value: bytes, size: int) -> bytes:
    """An xattr reply: the value's size when asked with size 0, ERANGE when it is larger
    than the caller's buffer."""
    if size == 0:
        return fp.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise ReplyError(errno.ERANGE)
    return value
