"""A do-nothing filesystem on DynamicFS's FUSE session: the floor under the mount daemon.

    python benchmarks/null_fuse.py MOUNTPOINT

Keeps names and attributes in dicts, discards file data, answers every request at once,
through the same session (fuse/session.py: worker threads reading /dev/fuse) and reply
layouts (fuse/protocol.py) as the mount daemon. bench_mount.py creates its small files
here too: what that takes is what the kernel's round trips and the Python around them
cost before a filesystem does any work of its own. Unmount with `umount MOUNTPOINT`.
"""

from __future__ import annotations

import errno
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from dynamicfs.fuse import protocol as fp
from dynamicfs.fuse.session import MountRequest, Reply, ReplyError, Session
from dynamicfs.namespace.types import ROOT_INO, Attr

BLOCK_SIZE = 1 << 20
TIMEOUT = 1.0


class NullFS:
    def __init__(self) -> None:
        self.attrs = {ROOT_INO: self._attr(ROOT_INO, stat.S_IFDIR | 0o755)}
        self.names: dict[tuple[int, bytes], int] = {}
        self.lock = threading.Lock()

    @staticmethod
    def _attr(ino: int, mode: int, size: int = 0) -> Attr:
        now = time.time_ns()
        return Attr(ino, mode, 1, 0, 0, 0, size, 0, now, now, now)

    def _new(self, parent: int, name: bytes, mode: int) -> Attr:
        with self.lock:
            ino = len(self.attrs) + ROOT_INO
            self.attrs[ino] = self._attr(ino, mode)
            self.names[(parent, name)] = ino
            return self.attrs[ino]

    def handle(self, req: fp.Request) -> Reply:
        op = req.opcode
        if op == fp.LOOKUP:
            ino = self.names.get((req.nodeid, fp.names(req.args, 1)[0]))
            if ino is None:
                raise ReplyError(errno.ENOENT)
            return fp.pack_entry(self.attrs[ino], BLOCK_SIZE, TIMEOUT)
        if op == fp.GETATTR:
            return fp.pack_attr_out(self.attrs[req.nodeid], BLOCK_SIZE, TIMEOUT)
        if op == fp.MKDIR:
            mode, _ = fp.MKDIR_IN.unpack_from(req.args)
            name = fp.names(req.args[fp.MKDIR_IN.size:], 1)[0]
            return fp.pack_entry(self._new(req.nodeid, name, stat.S_IFDIR | mode), BLOCK_SIZE,
                                 TIMEOUT)
        if op == fp.CREATE:
            _, mode, _, _ = fp.CREATE_IN.unpack_from(req.args)
            name = fp.names(req.args[fp.CREATE_IN.size:], 1)[0]
            attr = self._new(req.nodeid, name, stat.S_IFREG | mode)
            return fp.pack_entry(attr, BLOCK_SIZE, TIMEOUT) + fp.pack_open(attr.ino, 0)
        if op == fp.WRITE:
            fh, offset, size, _, _, _, _ = fp.WRITE_IN.unpack_from(req.args)
            with self.lock:
                attr = self.attrs[fh]
                if offset + size > attr.size:
                    self.attrs[fh] = self._attr(fh, attr.mode, offset + size)
            return fp.WRITE_OUT.pack(size, 0)
        if op == fp.GETXATTR:
            raise ReplyError(errno.ENODATA)
        if op in (fp.FLUSH, fp.RELEASE, fp.RELEASEDIR):
            return b""
        if op in (fp.OPEN, fp.OPENDIR):
            return fp.pack_open(req.nodeid, 0)
        raise ReplyError(errno.ENOSYS)


def main() -> int:
    mnt = Path(sys.argv[1]).absolute()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    session = Session(MountRequest(mnt, "nullfs", "nullfs"), NullFS().handle)
    session.start()
    session.wait()
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
