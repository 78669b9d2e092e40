"""The control server inside the mount daemon: runs admin operations on the live pool.

One thread accepts connections; each connection gets a thread that reads one request,
runs the operation through the admin registry (so its effect is visible in the mount
at once) and streams progress and the result back. The socket is owner-only (0600).
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from dynamicfs.admin import registry
from dynamicfs.control.protocol import SOCKET_NAME, lines, send
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.observability.log import error, log


class ControlServer:
    def __init__(self, pool: Pool, before_op: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.path = Path(pool.path) / SOCKET_NAME
        self.before_op = before_op
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._op_lock = threading.Lock()

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="dynamicfs-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="dynamicfs-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = next(lines(conn))
            except (StopIteration, ValueError, OSError):
                return
            name = str(request.get("op", ""))
            args = request.get("args") or {}

            def progress(done: int, total: int, message: str) -> None:
                try:
                    send(conn, {"progress": [done, total, message]})
                except OSError:
                    pass

            try:
                op = registry.get(name)
                if self.before_op is not None:
                    self.before_op(name)
                # Admin operations that change the pool run one at a time.
                if op.writes:
                    with self._op_lock:
                        result = registry.run(self.pool, name, args, progress)
                else:
                    result = registry.run(self.pool, name, args, progress)
                log("admin operation", op=name, args=args, via="control")
                send(conn, {"result": result})
            except DynamicFSError as exc:
                send(conn, {"error": str(exc), "exit_code": exc.exit_code})
            except Exception as exc:  # a bug: keep the daemon alive, tell the client
                error("admin operation crashed", op=name, trace=traceback.format_exc())
                try:
                    send(conn, {"error": f"internal error in {name}: {exc!r} "
                                         "(see the pool's log)", "exit_code": 70})
                except OSError:
                    pass
