"""The pyfuse3 adapter: each FUSE request becomes one call of the namespace.

Owns the translation between FUSE and the namespace and nothing else: inode numbers
are the namespace's, a file handle is the inode number of the opened file (the
namespace counts opens per inode), errors become errno values. POSIX semantics,
buffering and durability live in namespace/fs.py.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from dynamicfs.errors import DynamicFSError
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import Attr
from dynamicfs.observability.log import error
from dynamicfs.observability.metrics import FUSE_OP_ERRORS, observe_fuse

# Attributes and entries the kernel may cache without asking again. Everything that
# changes them goes through this mount, so the kernel invalidates what it changes itself;
# the timeout only bounds how stale st_blocks may look after a background conversion.
CACHE_TIMEOUT = 1.0
# How long the event loop waits for the namespace lock before handing a request to a
# worker thread. The lock's holders (the flusher, the recorder) hold it briefly, but on
# two busy cores one is often waiting for a CPU or the GIL just then: waiting up to
# 1 ms took 1 GiB ec:4+2 writes from 399 to 443 MiB/s (mean of five pairs) and sent
# 4% of the 1 MiB writes to a thread instead of 10% (those took 4 ms each).
INLINE_LOCK_WAIT = 0.001
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
READDIR_BATCH = 64
# POSIX ACLs are not supported (enable_acl is off). Refusing to store them makes cp -a,
# tar and rsync fall back to chmod; stored as plain xattrs they would leave modes stale.
ACL_XATTRS = frozenset({b"system.posix_acl_access", b"system.posix_acl_default"})

T = TypeVar("T")
P = ParamSpec("P")


def _handler(handler: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Time a request handler for the metrics and turn whatever it raises into FUSEError.

    pyfuse3 ends its main loop on any other exception, which would hang the mount, so a
    bug becomes EIO and a log entry instead.
    """
    op = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        code = 0
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            code = exc.errno
            raise
        except OSError as exc:  # FsError and its subclasses, and real I/O errors
            code = exc.errno or errno.EIO
            raise pyfuse3.FUSEError(code) from None
        except DynamicFSError as exc:
            code = errno.EIO
            error("request failed", op=op, reason=str(exc))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            code = errno.EIO
            error("request crashed", op=op, trace=traceback.format_exc())
            raise pyfuse3.FUSEError(code) from None
        finally:
            observe_fuse(op, time.perf_counter() - start)
            if code:
                FUSE_OP_ERRORS.labels(op, errno.errorcode.get(code, str(code))).inc()

    return wrapper


def kernel_keeps_cache_right_around_direct_writes(release: str | None = None) -> bool:
    """Whether this Linux (`uname -r`) invalidates cached pages before and after each
    write through a FOPEN_DIRECT_IO file (see WRITE_ONLY_DIRECT_SINCE)."""
    digits = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or os.uname().release)
    if digits is None:
        return False
    version = tuple(int(d or 0) for d in digits.groups())
    newest, backport = WRITE_ONLY_DIRECT_SINCE
    return version >= newest or (version[:2] == backport[:2] and version >= backport)


class Operations(pyfuse3.Operations):
    """FUSE request handlers over one Namespace.

    Concurrency rules:
    - Handlers run as trio tasks in the daemon's one event-loop thread; pyfuse3 starts
      a task per outstanding request (up to its max_tasks), so requests overlap.
    - Namespace calls may block (disk I/O, waiting for the flusher, the metadata lock),
      so they run in worker threads through `trio.to_thread.run_sync` (`_run`); the
      namespace is thread-safe and does its own locking. Nothing here holds state
      between requests except the namespace itself, so handlers need no locks.
    - Exception (`_run_quick`): calls that only read or change metadata in memory and
      SQLite (lookup, getattr, setattr without a size, readlink, getxattr, listxattr,
      flush, readdir, and the changes of names: create, mknod, mkdir, symlink, link,
      unlink, rmdir, rename (`rename_nowait`), setxattr, removexattr) run on the event
      loop itself when the namespace lock is free at that moment. So do write, read and release when
      the namespace can do them from memory at once (`_try_inline` with `write_nowait`,
      `read_nowait` for extents already read ahead, `release_nowait`: no fragment to
      read, no back-pressure); otherwise they go to a worker thread. A getxattr of a
      name no inode has (the `security.capability` the kernel asks before every write)
      is answered without even the lock (`xattr_never_set`). A thread hop costs ~80 us
      here, more than such a call; `ls -lR` of 2,000 files got 2.5x faster. When the
      lock is taken (a commit, the flusher recording a batch) they go to a worker
      thread, so the loop never waits for the lock; write, read and release first wait
      up to INLINE_LOCK_WAIT for it. Such namespace methods must never wait on a
      condition nor touch fragments.
    - `pyfuse3.readdir_reply` must be called from the event-loop thread: readdir
      fetches a batch of entries (through `_run_quick`) and replies from the loop.
    - Handlers raise only FUSEError, and each is timed for the metrics (`_handler`).

    Meaning of the values handed to the kernel:
    - inode numbers are namespace inode numbers (the root is 1); generation is 0
      because inode numbers are never reused while the pool exists;
    - a file handle `fh` is the inode number of the open file; open() and create()
      count one open in the namespace and release() gives it back, so the namespace
      knows when the last handle is gone (write-back, freeing unlinked files);
    - a directory handle is the directory's inode number;
    - readdir offsets are the namespace's entry ids, stable while the directory
      changes; "." and ".." are not listed (lookup answers them, and readdir would
      have to leave their lookup counts alone);
    - lookup counts are not tracked (forget is a no-op): the namespace keeps an
      unlinked inode exactly as long as it is open, and the kernel never needs an
      unopened, unlinked inode again.
    Permissions are checked by the kernel (mount option default_permissions), so
    access() always allows. POSIX ACLs are not supported: setting one fails with
    EOPNOTSUPP, which tools take as "use the mode bits".
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, namespace: Namespace, *, timeout: float = CACHE_TIMEOUT) -> None:
        super().__init__()
        self.ns = namespace
        self.timeout = timeout
        self.write_only_direct = kernel_keeps_cache_right_around_direct_writes()

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    def _try_inline(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Call a namespace method that does its work only if it needs no waiting (it
        returns None or False otherwise), if the namespace lock is free within
        INLINE_LOCK_WAIT."""
        lock = self.ns.lock
        if not lock.acquire(timeout=INLINE_LOCK_WAIT):
            return None
        try:
            return fn(*args)
        finally:
            lock.release()

    async def _run_quick(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a metadata-only call inline if the namespace lock is free, else in a thread."""
        lock = self.ns.lock
        if lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                lock.release()
        return await self._run(fn, *args)

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = 0
        entry.entry_timeout = self.timeout
        entry.attr_timeout = self.timeout
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = BLOCK_SIZE
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    # ------------------------------------------------------------------ names
    @_handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.lookup, parent_inode, name))

    @_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.getattr, inode))

    @_handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # pyfuse3 has already replaced UTIME_NOW by the current time in `attr`.
        change = functools.partial(
            self.ns.setattr, inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)
        # A new size may read and write file data; everything else is metadata.
        run = self._run if fields.update_size else self._run_quick
        return self._entry(await run(change))

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.mknod, parent_inode, name, mode, rdev,
                                           ctx.uid, ctx.gid))

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.mkdir, parent_inode, name, mode,
                                           ctx.uid, ctx.gid))

    @_handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = await self._run_quick(self.ns.create, parent_inode, name, mode, ctx.uid, ctx.gid)
        return self._file_info(attr.ino, flags), self._entry(attr)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.symlink, parent_inode, name, target,
                                           ctx.uid, ctx.gid))

    @_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._run_quick(self.ns.readlink, inode)

    @_handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run_quick(self.ns.link, inode, new_parent_inode, new_name))

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run_quick(self.ns.unlink, parent_inode, name)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run_quick(self.ns.rmdir, parent_inode, name)

    @_handler
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        # pyfuse3's RENAME_NOREPLACE/RENAME_EXCHANGE (1, 2) are the namespace's values.
        # A file replacing another waits for its data to be recorded: in a thread.
        if not await self._run_quick(self.ns.rename_nowait, parent_inode_old, name_old,
                                     parent_inode_new, name_new, flags):
            await self._run(self.ns.rename, parent_inode_old, name_old, parent_inode_new,
                            name_new, flags)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Lookup counts are not tracked; see the class docstring."""

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True

    # ------------------------------------------------------------------ files
    @_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        await self._run_quick(self.ns.open, inode)
        if flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            # Only with atomic_o_trunc; otherwise the kernel sends setattr(size=0) itself.
            try:
                await self._run(self.ns.setattr, inode, size=0)
            except BaseException:
                await self._run(self.ns.release, inode)
                raise
        return self._file_info(inode, flags)

    def _file_info(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        """keep_cache: pages of this file stay valid across opens (every change to the
        file passes through this mount), so mmap and re-reads are served by the kernel.
        direct_io for write-only opens where the kernel allows it (WRITE_ONLY_DIRECT_SINCE)."""
        direct = self.write_only_direct and flags & os.O_ACCMODE == os.O_WRONLY
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=direct)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        done = self._try_inline(self.ns.read_nowait, fh, off, size)
        if done is not None:
            return done
        return await self._run(self.ns.read, fh, off, size)

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        done = self._try_inline(self.ns.write_nowait, fh, off, buf)
        if done is not None:
            return done
        return await self._run(self.ns.write, fh, off, buf)

    @_handler
    async def flush(self, fh: int) -> None:
        await self._run_quick(self.ns.flush, fh)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._run(self.ns.fsync, fh, datasync)

    @_handler
    async def release(self, fh: int) -> None:
        if not self._try_inline(self.ns.release_nowait, fh):
            await self._run(self.ns.release, fh)

    @_handler
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # pyfuse3 3.5 does not dispatch FUSE_FALLOCATE (the kernel answers EOPNOTSUPP and
        # glibc's posix_fallocate writes zeros instead); kept for when it does.
        if mode != 0:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        await self._run(self.ns.fallocate, fh, offset, length)

    # ------------------------------------------------------------------ directories
    @_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        attr = await self._run_quick(self.ns.getattr, inode)
        if not stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        offset = start_id
        while True:
            # The kernel's buffer holds a few dozen entries: fetch about that many.
            entries = await self._run_quick(self.ns.readdir, fh, offset, READDIR_BATCH)
            for entry in entries:
                if not pyfuse3.readdir_reply(token, entry.name, self._entry(entry.attr),
                                             entry.next_offset):
                    return
                offset = entry.next_offset
            if len(entries) < READDIR_BATCH:
                return

    async def releasedir(self, fh: int) -> None:
        pass

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._run(self.ns.fsync, fh, datasync)

    # ------------------------------------------------------------------ xattrs
    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if self.ns.xattr_never_set(name):  # e.g. security.capability, before every write
            raise pyfuse3.FUSEError(errno.ENODATA)
        return await self._run_quick(self.ns.getxattr, inode, name)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if name in ACL_XATTRS:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        await self._run_quick(self.ns.setxattr, inode, name, value)

    @_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return await self._run_quick(self.ns.listxattr, inode)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run_quick(self.ns.removexattr, inode, name)

    # ------------------------------------------------------------------ filesystem
    @_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = await self._run(self.ns.statfs)
        out = pyfuse3.StatvfsData()
        out.f_bsize = stats.block_size
        out.f_frsize = stats.fragment_size
        out.f_blocks = stats.blocks
        out.f_bfree = stats.blocks_free
        out.f_bavail = stats.blocks_avail
        out.f_files = stats.files
        out.f_ffree = stats.files_free
        out.f_favail = stats.files_free
        out.f_namemax = stats.name_max
        return out
