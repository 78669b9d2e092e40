"""A do-nothing pyfuse3 filesystem: the floor under any Python FUSE daemon here.

    python benchmarks/null_fuse.py MOUNTPOINT

Keeps names and attributes in dicts, discards file data, answers every request at once.
bench_mount.py creates its small files here too: what that takes is what pyfuse3, trio
and the kernel's round trips cost before a filesystem does any work of its own.
Unmount with `fusermount3 -u MOUNTPOINT`.
"""

from __future__ import annotations

import errno
import stat
import sys
import time

import pyfuse3
import trio


class NullFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.attrs = {pyfuse3.ROOT_INODE: self._attr(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.names: dict[tuple[int, bytes], int] = {}

    def _attr(self, ino: int, mode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode, attr.st_nlink = ino, mode, 1
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
        attr.entry_timeout = attr.attr_timeout = 1.0
        attr.st_blksize = 1 << 20
        return attr

    def _new(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
        ino = len(self.attrs) + pyfuse3.ROOT_INODE
        self.attrs[ino] = self._attr(ino, mode)
        self.names[(parent, name)] = ino
        return self.attrs[ino]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        ino = self.names.get((parent_inode, name))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs[ino]

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._new(parent_inode, name, stat.S_IFDIR | mode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = self._new(parent_inode, name, stat.S_IFREG | mode)
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        attr = self.attrs[fh]
        attr.st_size = max(attr.st_size, off + len(buf))
        return len(buf)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


def main() -> int:
    options = set(pyfuse3.default_options)
    options.add("fsname=nullfs")
    pyfuse3.init(NullFS(), sys.argv[1], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
