"""The FUSE wire format: what the kernel sends on /dev/fuse and what it expects back.

Owns the byte layouts of requests and replies (the kernel's include/uapi/linux/fuse.h,
protocol version 7.31, the version libfuse 3.14 speaks; the kernel keeps to what the
daemon's INIT reply names) and nothing else: no file descriptors, no threads, no
meaning. Every integer is in the machine's byte order, as the kernel writes it.

A request is a 40-byte header (`Request`) followed by the opcode's arguments; a reply
is a 16-byte header (length, negative errno, the request's unique id) followed by the
opcode's result. Requests that get no reply: FORGET, BATCH_FORGET, INTERRUPT.
"""

from __future__ import annotations

import stat
import struct
from typing import NamedTuple

from dynamicfs.namespace.types import Attr

KERNEL_MAJOR = 7
KERNEL_MINOR = 31

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (FUSE_*): what DynamicFS asks for, the set libfuse 3 asks for by default.
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
WANTED_FLAGS = (ASYNC_READ | ATOMIC_O_TRUNC | EXPORT_SUPPORT | BIG_WRITES | AUTO_INVAL_DATA
                | DO_READDIRPLUS | ASYNC_DIO | MAX_PAGES)

# fuse_open_out.open_flags (FOPEN_*).
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1

# fuse_setattr_in.valid (FATTR_*).
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

FSYNC_FDATASYNC = 1

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("=IiQ")  # len, error (negative errno), unique
INIT_IN = struct.Struct("=IIII")  # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, then 32 unused bytes.
INIT_OUT = struct.Struct("=IIIIHHIIHH32x")
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, padding.
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("=QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs
ATTR_OUT = struct.Struct("=QII")  # attr_valid, attr_valid_nsec, dummy
OPEN_OUT = struct.Struct("=QII")  # fh, open_flags, padding
OPEN_IN = struct.Struct("=II")  # flags, open_flags
CREATE_IN = struct.Struct("=IIII")  # flags, mode, umask, open_flags
MKNOD_IN = struct.Struct("=IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("=II")  # mode, umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir, flags, padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
# fh, offset, size, read_flags / write_flags, lock_owner, flags, padding.
READ_IN = WRITE_IN = struct.Struct("=QQIIQII")
WRITE_OUT = struct.Struct("=II")  # size, padding
RELEASE_IN = struct.Struct("=QIIQ")  # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("=QIIQ")  # fh, unused, padding, lock_owner
FSYNC_IN = struct.Struct("=QII")  # fh, fsync_flags, padding
FALLOCATE_IN = struct.Struct("=QQQII")  # fh, offset, length, mode, padding
# valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec,
# ctimensec, mode, unused, uid, gid, unused.
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
SETXATTR_IN = struct.Struct("=II")  # size, flags
GETXATTR_IN = struct.Struct("=II")  # size, padding
GETXATTR_OUT = struct.Struct("=II")  # size, padding
# blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6].
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
DIRENT = struct.Struct("=QQII")  # ino, off, namelen, type


class Request(NamedTuple):
    """One request: its header's fields and its arguments (a view of the read buffer,
    valid only until the worker that read it reads the next request)."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    args: memoryview


def parse_request(buf: memoryview) -> Request:
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = IN_HEADER.unpack_from(buf)
    # Extensions (8-byte units after the arguments) come only with INIT flags DynamicFS
    # does not ask for; cut them off all the same.
    end = length - extlen * 8
    return Request(opcode, unique, nodeid, uid, gid, pid, buf[IN_HEADER.size:end])


def names(args: memoryview, count: int) -> list[bytes]:
    """The first `count` NUL-terminated names in `args`."""
    return bytes(args).split(b"\0", count)[:count]


def _split_ns(ns: int) -> tuple[int, int]:
    return divmod(ns, 1_000_000_000)


def _split_timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def pack_attr(a: Attr, blksize: int) -> bytes:
    atime, atime_ns = _split_ns(a.atime_ns)
    mtime, mtime_ns = _split_ns(a.mtime_ns)
    ctime, ctime_ns = _split_ns(a.ctime_ns)
    return ATTR.pack(a.ino, a.size, a.blocks, atime, mtime, ctime, atime_ns, mtime_ns,
                     ctime_ns, a.mode, a.nlink, a.uid, a.gid, a.rdev, blksize, 0)


def pack_entry(a: Attr, blksize: int, timeout: float) -> bytes:
    """fuse_entry_out: the inode behind a name, both cached `timeout` seconds. The
    generation is 0: inode numbers are never reused while the pool exists."""
    secs, nsecs = _split_timeout(timeout)
    return ENTRY_OUT.pack(a.ino, 0, secs, secs, nsecs, nsecs) + pack_attr(a, blksize)


def pack_negative_entry(timeout: float) -> bytes:
    """fuse_entry_out for a name that does not exist: node id 0 makes the kernel keep
    the miss for `timeout` seconds instead of asking again."""
    secs, nsecs = _split_timeout(timeout)
    return ENTRY_OUT.pack(0, 0, secs, 0, nsecs, 0) + bytes(ATTR.size)


def pack_attr_out(a: Attr, blksize: int, timeout: float) -> bytes:
    secs, nsecs = _split_timeout(timeout)
    return ATTR_OUT.pack(secs, nsecs, 0) + pack_attr(a, blksize)


def pack_open(fh: int, flags: int) -> bytes:
    return OPEN_OUT.pack(fh, flags, 0)


def _dirent_size(base: int, name: bytes) -> int:
    return (base + len(name) + 7) & ~7


def pack_dirent(name: bytes, ino: int, mode: int, next_offset: int) -> bytes:
    """fuse_dirent, padded to 8 bytes."""
    head = DIRENT.pack(ino, next_offset, len(name), stat.S_IFMT(mode) >> 12)
    return (head + name).ljust(_dirent_size(DIRENT.size, name), b"\0")


def pack_direntplus(name: bytes, a: Attr, blksize: int, timeout: float,
                    next_offset: int) -> bytes:
    """fuse_direntplus: the entry (as for LOOKUP) followed by the dirent."""
    return pack_entry(a, blksize, timeout) + pack_dirent(name, a.ino, a.mode, next_offset)


def reply_header(unique: int, length: int, error: int = 0) -> bytes:
    """The reply header for `length` bytes of result (error: a positive errno)."""
    return OUT_HEADER.pack(OUT_HEADER.size + length, -error, unique)
